"""HF checkpoint keys <-> trimformer encoder keys, with load-time Q/K/V fusion and strict key/shape checks.

A key map is a list of ``(our_key, (hf_key, ...))`` pairs: one HF key is renamed; several (query, key, value) are
concatenated along dim 0 into one fused tensor, and split back by :func:`to_hf_state_dict`.

Strictness: every key the map expects must be present with the right shape, and every checkpoint key must be
used, except (a) keys outside the base model when the checkpoint has a task head (``bert.``/``roberta.``/...
prefix: ``cls.*``, ``lm_head.*``, ``classifier.*`` belong to heads we do not run), (b) the pooler and (c) HF's
non-persistent buffers (``embeddings.position_ids``, ``embeddings.token_type_ids``). Anything else raises a
``ValueError`` listing the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from trimformer.models.encoders.config import EncoderConfig

KeyMap = list[tuple[str, tuple[str, ...]]]

# Base-model keys that exist in HF checkpoints but are not part of the encoder we run.
_IGNORED = re.compile(r"^(pooler\..*|embeddings\.position_ids|embeddings\.token_type_ids)$")
_LEGACY = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))

_BERT_LAYER = {
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "out": ("attention.output.dense",),
    "attn_norm": ("attention.output.LayerNorm",),
    "ffn_in": ("intermediate.dense",),
    "ffn_out": ("output.dense",),
    "ffn_norm": ("output.LayerNorm",),
}
_DISTILBERT_LAYER = {
    "qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    "out": ("attention.out_lin",),
    "attn_norm": ("sa_layer_norm",),
    "ffn_in": ("ffn.lin1",),
    "ffn_out": ("ffn.lin2",),
    "ffn_norm": ("output_layer_norm",),
}
_ALBERT_LAYER = {
    "qkv": ("attention.query", "attention.key", "attention.value"),
    "out": ("attention.dense",),
    "attn_norm": ("attention.LayerNorm",),
    "ffn_in": ("ffn",),
    "ffn_out": ("ffn_output",),
    "ffn_norm": ("full_layer_layer_norm",),
}


def base_prefix(model_type: str) -> str:
    """HF ``base_model_prefix`` of the family (the key prefix in checkpoints saved with a task head)."""
    return {"xlm-roberta": "roberta"}.get(model_type, model_type)


def hf_key_map(config: EncoderConfig) -> KeyMap:
    """``[(our_key, (hf_keys...))]`` for the base model of ``config.model_type`` (no prefix)."""
    pairs: KeyMap = [
        ("embeddings.word.weight", ("embeddings.word_embeddings.weight",)),
        ("embeddings.position.weight", ("embeddings.position_embeddings.weight",)),
    ]
    if config.type_vocab_size > 0:
        pairs.append(("embeddings.token_type.weight", ("embeddings.token_type_embeddings.weight",)))
    pairs += [
        ("embeddings.norm.weight", ("embeddings.LayerNorm.weight",)),
        ("embeddings.norm.bias", ("embeddings.LayerNorm.bias",)),
    ]
    if config.model_type == "distilbert":
        layer_names, layer_prefix = _DISTILBERT_LAYER, [f"transformer.layer.{i}." for i in range(config.num_layers)]
    elif config.model_type == "albert":
        pairs += [
            ("embeddings.project.weight", ("encoder.embedding_hidden_mapping_in.weight",)),
            ("embeddings.project.bias", ("encoder.embedding_hidden_mapping_in.bias",)),
        ]
        layer_names = _ALBERT_LAYER
        layer_prefix = [
            f"encoder.albert_layer_groups.{g}.albert_layers.{j}."
            for g in range(config.num_hidden_groups)
            for j in range(config.inner_group_num)
        ]
    else:
        layer_names, layer_prefix = _BERT_LAYER, [f"encoder.layer.{i}." for i in range(config.num_layers)]
    for i, prefix in enumerate(layer_prefix):
        for ours, theirs in layer_names.items():
            for param in ("weight", "bias"):
                pairs.append((f"layers.{i}.{ours}.{param}", tuple(f"{prefix}{t}.{param}" for t in theirs)))
    return pairs


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def normalize_checkpoint_keys(
    state: Mapping[str, torch.Tensor], config: EncoderConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the task-model prefix (``bert.``, ``roberta.``, ...) and rename legacy ``gamma``/``beta`` keys.

    Returns:
        ``(base_model_state, dropped)``: the base model's tensors keyed as in a bare ``*Model`` checkpoint, and the
        keys that were set aside (task heads outside the prefix, pooler, non-persistent buffers).
    """
    prefix = base_prefix(config.model_type) + "."
    has_prefix = any(k.startswith(prefix + "embeddings.") for k in state)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if has_prefix:
            if not key.startswith(prefix):
                dropped.append(key)
                continue
            key = key[len(prefix) :]
        for old, new in _LEGACY:
            if key.endswith(old):
                key = key[: -len(old)] + new
        if _IGNORED.match(key):
            dropped.append(key)
            continue
        out[key] = value
    return out, dropped


def from_hf_state_dict(
    state: Mapping[str, torch.Tensor],
    config: EncoderConfig,
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map an HF state dict onto trimformer keys, fusing Q/K/V; strict about keys and shapes.

    Args:
        state: HF tensors (a bare ``*Model`` or a task model with the family prefix).
        config: the parsed config.
        expected_shapes: ``{our_key: shape}`` of the model the tensors are for.
        source: named in error messages (the checkpoint path).

    Returns:
        ``{our_key: tensor}`` covering exactly ``expected_shapes``.

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches (HF key names).
    """
    base, _ = normalize_checkpoint_keys(state, config)
    key_map = hf_key_map(config)
    expected_hf: dict[str, tuple[int, ...]] = {}
    for ours, theirs in key_map:
        shape = tuple(expected_shapes[ours])
        part = (shape[0] // len(theirs), *shape[1:])
        for t in theirs:
            expected_hf[t] = part
    missing = sorted(k for k in expected_hf if k not in base)
    unexpected = sorted(k for k in base if k not in expected_hf)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(base[k].shape)} vs expected {expected_hf[k]}"
        for k in expected_hf
        if k in base and tuple(base[k].shape) != expected_hf[k]
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched)}")
        raise ValueError(f"{source} does not match its {config.model_type} config: " + "; ".join(problems))
    out = {}
    for ours, theirs in key_map:
        tensors = [base[t] for t in theirs]
        out[ours] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
    return out


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: EncoderConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_hf_state_dict`: trimformer keys -> bare HF ``*Model`` keys (Q/K/V split again)."""
    out = {}
    for ours, theirs in hf_key_map(config):
        tensor = state[ours]
        if len(theirs) == 1:
            out[theirs[0]] = tensor
        else:
            for t, chunk in zip(theirs, tensor.chunk(len(theirs), dim=0)):
                out[t] = chunk
    return out
