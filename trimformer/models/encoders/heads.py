"""Sequence-classification heads (cross-encoders, classifiers) for the padding-free encoders.

HF ``*ForSequenceClassification`` checkpoints store the encoder under the family prefix (``bert.``, ``roberta.``,
...), which :func:`~trimformer.models.encoders.load_encoder` loads, plus a head outside it, which this module loads.
Each head reads the first token of every packed sequence (``[CLS]`` / ``<s>``) and maps it to ``num_labels``
logits, exactly as HF does at inference time (dropout is a no-op):

=================  ==========================================================  ==============================
family             head                                                        HF keys
=================  ==========================================================  ==============================
bert               ``classifier(tanh(pooler(h0)))``                            ``bert.pooler.dense.*``,
                                                                               ``classifier.*``
albert             ``classifier(tanh(pooler(h0)))``                            ``albert.pooler.*``,
                                                                               ``classifier.*``
roberta, xlm-r     ``out_proj(tanh(dense(h0)))``                               ``classifier.dense.*``,
                                                                               ``classifier.out_proj.*``
distilbert         ``classifier(relu(pre_classifier(h0)))``                    ``pre_classifier.*``,
                                                                               ``classifier.*``
=================  ==========================================================  ==============================

The head runs in float32 whatever the encoder's dtype (it is two small GEMMs on ``N`` rows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trimformer.models.encoders.config import EncoderConfig

#: ``model_type`` -> (HF keys of the first linear, HF keys of the output linear, activation between them).
_HEAD_KEYS: dict[str, tuple[str, str, str]] = {
    "bert": ("bert.pooler.dense", "classifier", "tanh"),
    "albert": ("albert.pooler", "classifier", "tanh"),
    "roberta": ("classifier.dense", "classifier.out_proj", "tanh"),
    "xlm-roberta": ("classifier.dense", "classifier.out_proj", "tanh"),
    "distilbert": ("pre_classifier", "classifier", "relu"),
}

#: ``model_type`` values whose sequence-classification heads trimformer runs.
HEAD_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_HEAD_KEYS))

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


@dataclass(frozen=True)
class ClassifierConfig:
    """What ``config.json`` says about a sequence-classification head.

    Attributes:
        num_labels: logits per input.
        id2label: label name of each logit (``LABEL_i`` when the config names none).
        problem_type: HF ``problem_type`` (``None`` when unset: single-label for ``num_labels > 1``).
        architecture: the ``*ForSequenceClassification`` class named in ``architectures``.
    """

    num_labels: int
    id2label: tuple[str, ...]
    problem_type: str | None
    architecture: str


def classifier_config(path: str | Path) -> ClassifierConfig | None:
    """The head described by ``<path>/config.json``, or ``None`` for a checkpoint without one.

    A folder has a sequence-classification head when its ``architectures`` names a ``*ForSequenceClassification``
    class. ``num_labels`` comes from ``id2label`` (else ``num_labels``, else HF's default of 2).

    Raises:
        ValueError: unreadable ``config.json``, an ``id2label`` that does not cover ``0..num_labels-1``, or an
            unknown ``problem_type``.
    """
    cfg_file = Path(path) / "config.json"
    try:
        d = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {cfg_file}: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object")
    archs = [a for a in d.get("architectures") or [] if isinstance(a, str) and a.endswith("ForSequenceClassification")]
    if not archs:
        return None
    raw = d.get("id2label")
    if isinstance(raw, dict) and raw:
        try:
            labels = {int(k): str(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{cfg_file}: id2label keys must be integers, got {sorted(raw)!r}") from None
        n = len(labels)
        if sorted(labels) != list(range(n)):
            raise ValueError(f"{cfg_file}: id2label must map 0..{n - 1}, got keys {sorted(labels)}")
        names = tuple(labels[i] for i in range(n))
    else:
        n = int(d.get("num_labels", 2))
        names = tuple(f"LABEL_{i}" for i in range(n))
    problem = d.get("problem_type")
    if problem is not None and problem not in PROBLEM_TYPES:
        raise ValueError(f"{cfg_file}: unknown problem_type {problem!r}; expected one of {', '.join(PROBLEM_TYPES)}")
    return ClassifierConfig(num_labels=n, id2label=names, problem_type=problem, architecture=archs[0])


class SequenceClassificationHead(nn.Module):
    """``out(act(dense(h0)))`` on the first token of each packed sequence, in float32.

    Parameters: ``dense.weight`` ``[H, H]``, ``dense.bias`` ``[H]``, ``out.weight`` ``[L, H]``, ``out.bias`` ``[L]``.

    Args:
        hidden_size: ``H``.
        num_labels: ``L``.
        activation: ``"tanh"`` (BERT/ALBERT pooler, RoBERTa head) or ``"relu"`` (DistilBERT).
        device: where the (uninitialised) float32 parameters live.
    """

    def __init__(
        self, hidden_size: int, num_labels: int, activation: str, *, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        if activation not in ("tanh", "relu"):
            raise ValueError(f"head activation must be 'tanh' or 'relu', got {activation!r}")
        if num_labels <= 0:
            raise ValueError(f"num_labels must be positive, got {num_labels}")
        self.activation = activation
        self.dense = nn.Linear(hidden_size, hidden_size, device=device, dtype=torch.float32)
        self.out = nn.Linear(hidden_size, num_labels, device=device, dtype=torch.float32)

    @property
    def num_labels(self) -> int:
        return self.out.out_features

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Logits of each sequence.

        Args:
            hidden: ``[T, H]`` last hidden states of ``N`` packed sequences (any float dtype).
            cu_seqlens: ``[N + 1]`` int32 offsets on ``hidden``'s device.

        Returns:
            ``[N, L]`` float32 logits on ``hidden``'s device (no host synchronisation).
        """
        first = hidden.index_select(0, cu_seqlens[:-1].long()).float()
        x = F.linear(first, self.dense.weight, self.dense.bias)
        x = torch.tanh(x) if self.activation == "tanh" else torch.relu(x)
        return F.linear(x, self.out.weight, self.out.bias)


def head_key_map(model_type: str) -> dict[str, str]:
    """``{our_key: hf_key}`` of the head of ``model_type`` (``ValueError`` naming the supported families)."""
    if model_type not in _HEAD_KEYS:
        raise ValueError(
            f"sequence-classification heads are supported for {', '.join(HEAD_MODEL_TYPES)}; got {model_type!r}"
        )
    first, last, _ = _HEAD_KEYS[model_type]
    return {
        "dense.weight": f"{first}.weight",
        "dense.bias": f"{first}.bias",
        "out.weight": f"{last}.weight",
        "out.bias": f"{last}.bias",
    }


def head_from_state_dict(
    state: Mapping[str, torch.Tensor],
    config: EncoderConfig,
    num_labels: int,
    *,
    device: torch.device | str | None = None,
    source: str = "checkpoint",
) -> SequenceClassificationHead:
    """Build the head of ``config.model_type`` from HF tensors (strict keys and shapes).

    Args:
        state: HF tensors holding at least the head's keys (see :func:`head_key_map`).
        config: the encoder's parsed config (for the family and ``hidden_size``).
        num_labels: ``L`` from :class:`ClassifierConfig`.
        device: where the float32 head goes.
        source: named in error messages.

    Raises:
        ValueError: unsupported family, missing head keys or mis-shaped tensors.
    """
    keys = head_key_map(config.model_type)
    h = config.hidden_size
    shapes = {"dense.weight": (h, h), "dense.bias": (h,), "out.weight": (num_labels, h), "out.bias": (num_labels,)}
    missing = sorted(hf for hf in keys.values() if hf not in state)
    if missing:
        raise ValueError(
            f"{source} names a sequence-classification head but lacks its weights: missing {', '.join(missing)}"
        )
    bad = [
        f"{keys[k]}: checkpoint {tuple(state[keys[k]].shape)} vs expected {shape}"
        for k, shape in shapes.items()
        if tuple(state[keys[k]].shape) != shape
    ]
    if bad:
        raise ValueError(f"{source}: head shape mismatches: {'; '.join(bad)}")
    head = SequenceClassificationHead(h, num_labels, _HEAD_KEYS[config.model_type][2], device="meta")
    tensors = {k: state[hf].to(device=device, dtype=torch.float32) for k, hf in keys.items()}
    head.load_state_dict(tensors, strict=True, assign=True)
    return head.eval().requires_grad_(False)


def read_head_tensors(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of the checkpoint in ``path`` on the CPU (safetensors files are read key by key).

    Keys absent from the checkpoint are simply absent from the result.
    """
    from trimformer.models.encoders.loading import _weight_files

    wanted, out = set(names), {}
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for key in wanted.intersection(fh.keys()):
                    out[key] = fh.get_tensor(key)
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
            out.update({k: v for k, v in state.items() if k in wanted})
    return out


def load_head(
    path: str | Path,
    config: EncoderConfig,
    *,
    device: torch.device | str | None = None,
) -> tuple[SequenceClassificationHead, ClassifierConfig]:
    """Load the sequence-classification head of the checkpoint folder ``path`` (the encoder is loaded separately).

    Args:
        path: folder whose ``config.json`` names a ``*ForSequenceClassification`` architecture.
        config: the encoder config of the same folder (:func:`~trimformer.models.encoders.read_config`).
        device: where the float32 head goes.

    Returns:
        ``(head, classifier_config)``.

    Raises:
        ValueError: the folder has no classification head, an unsupported family, or missing/mis-shaped weights.
    """
    info = classifier_config(path)
    if info is None:
        raise ValueError(
            f"model folder {str(path)!r} has no sequence-classification head (its config.json architectures name "
            "no *ForSequenceClassification class)"
        )
    keys = head_key_map(config.model_type)
    state = read_head_tensors(path, list(keys.values()))
    head = head_from_state_dict(state, config, info.num_labels, device=device, source=f"checkpoint in {str(path)!r}")
    return head, info
