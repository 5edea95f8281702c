"""The training configuration: three sections (``model``, ``data``, ``train``) read from YAML, overridable by flags.

``model`` holds :class:`~trimformer.models.lm.TrimformerConfig` arguments (``attention`` is a nested dict of
:class:`~trimformer.layers.AttentionConfig` fields; ``vocab_size`` defaults to the tokenizer's, rounded up to a
multiple of 64; ``match_params``, when set, resizes the SwiGLU width so the model has about that many parameters).
``data`` and ``train`` are the dataclasses below. Overrides are ``section.key=value`` strings whose values are parsed
as YAML (``train.lr=1e-3``, ``model.attention.kind=gqa``, ``train.betas=[0.9,0.95]``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("auto", "fp32", "bf16")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-3`` as a string; this loader reads it (and ``1e4``) as a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """``yaml.safe_load`` that also reads ``1e-3``-style floats."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


DISTRIBUTED = ("auto", "none", "ddp", "fsdp")


@dataclass
class DataConfig:
    """Where the tokens come from.

    Attributes:
        corpus: ``"stdlib"`` or a folder of text files.
        tokenizer: ``"bytes"`` or a local HF tokenizer folder.
        seq_len: tokens per block (the longest segment the model sees).
        val_fraction: share of files in the validation split (by path hash).
        extensions: file suffixes to keep (``None``: ``.py`` for the stdlib, all files for a folder).
        max_files: use only the first files (sorted by path); ``None`` = all.
    """

    corpus: str = "stdlib"
    tokenizer: str = "bytes"
    seq_len: int = 512
    val_fraction: float = 0.02
    extensions: list[str] | None = None
    max_files: int | None = None


@dataclass
class TrainConfig:
    """Optimisation and run settings.

    Attributes:
        out_dir: run folder (``log.jsonl``, ``loss.png``, ``checkpoints/``, ``final/``).
        seed: model initialisation and data order.
        micro_batch_size: blocks (of ``seq_len`` tokens) per process per micro-step.
        grad_accum: micro-steps per optimizer step; the global batch is ``micro_batch_size * grad_accum * world``
            blocks.
        max_steps: optimizer steps (``max_tokens`` takes precedence when set).
        max_tokens: stop after this many training tokens (rounded up to whole steps).
        lr, min_lr_ratio, warmup_steps: AdamW peak learning rate; cosine decay to ``lr * min_lr_ratio`` at the last
            step after a linear warm-up.
        weight_decay, betas, eps: AdamW (no decay on norms, biases, conv biases and temperatures).
        grad_clip: max global gradient norm (0 = off).
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        distributed: ``"auto"`` (DDP when launched by torchrun with several processes), ``"none"``, ``"ddp"``,
            ``"fsdp"`` (FSDP2 ``fully_shard`` per decoder layer).
        eval_every, eval_tokens: validation loss every so many steps (and at the end) on the first tokens of the
            validation split (``0`` = never).
        log_every: steps between log lines.
        save_every: steps between checkpoints (``0`` = only at the end).
        save_final: write a checkpoint at the end (and when stopping early).
        keep_checkpoints: checkpoints kept on disk (oldest deleted first).
        resume: ``"auto"`` (latest checkpoint in ``out_dir`` if any), ``"none"``, or a checkpoint folder.
        time_budget_s: stop (with a checkpoint) when the run has used this many seconds.
        compile: ``torch.compile`` the model.
        progress: show a progress bar on rank 0.
        plot: write ``loss.png`` at every eval and at the end.
    """

    out_dir: str = "runs/trimformer"
    seed: int = 0
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    max_tokens: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    distributed: str = "auto"
    eval_every: int = 200
    eval_tokens: int = 131072
    log_every: int = 10
    save_every: int = 0
    save_final: bool = True
    keep_checkpoints: int = 2
    resume: str = "auto"
    time_budget_s: float | None = None
    compile: bool = False
    progress: bool = True
    plot: bool = True


@dataclass
class RunConfig:
    """The whole configuration of a training run."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        t = self.train
        if t.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {t.precision!r}")
        if t.distributed not in DISTRIBUTED:
            raise ValueError(f"train.distributed must be one of {DISTRIBUTED}, got {t.distributed!r}")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every"):
            if not isinstance(getattr(t, name), int) or getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be a positive int, got {getattr(t, name)!r}")
        for name in ("eval_every", "save_every", "warmup_steps", "eval_tokens", "keep_checkpoints"):
            if not isinstance(getattr(t, name), int) or getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be a non-negative int, got {getattr(t, name)!r}")
        if not t.lr > 0 or not 0 <= t.min_lr_ratio <= 1 or t.grad_clip < 0 or t.weight_decay < 0:
            raise ValueError("train.lr must be > 0, min_lr_ratio in [0, 1], grad_clip and weight_decay >= 0")
        if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
        if t.max_tokens is not None:
            if t.max_tokens < 1 or t.max_tokens != int(t.max_tokens):
                raise ValueError(f"train.max_tokens must be a positive whole number, got {t.max_tokens}")
            t.max_tokens = int(t.max_tokens)
        if t.time_budget_s is not None and not t.time_budget_s > 0:
            raise ValueError(f"train.time_budget_s must be positive, got {t.time_budget_s}")
        if self.data.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.data.seq_len}")
        if not isinstance(self.model, dict):
            raise ValueError("model must be a mapping of TrimformerConfig arguments")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable)."""
        return {"model": copy.deepcopy(self.model), "data": asdict(self.data), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of :meth:`to_dict`; unknown sections or keys raise ``ValueError``."""
        unknown = set(d) - {"model", "data", "train"}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected model, data, train")
        return cls(
            model=dict(d.get("model") or {}),
            data=_build(DataConfig, d.get("data") or {}, "data"),
            train=_build(TrainConfig, d.get("train") or {}, "train"),
        )


def _build(cls, values: dict[str, Any], section: str):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {section} keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key[.subkey]=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ValueError(f"override {item!r} needs a section: model.*, data.* or train.*")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a mapping")
        node[parts[-1]] = parse_yaml(raw)
    return d


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: malformed YAML structure, unknown keys or invalid values.
    """
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        d = parse_yaml(path.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: the top level must be a mapping with model/data/train sections")
    return RunConfig.from_dict(apply_overrides(d, list(overrides or [])))
