"""DeBERTa-v2/v3 (``model_type`` ``"deberta-v2"``) on the padding-free path: config, strict HF loading, model.

Relative positions are taken within each packed sequence, so a sequence's output does not depend on its
batchmates or on the padding side. Supported: ``relative_attention`` with ``pos_att_type`` any of ``c2p``/``p2c``,
``position_buckets`` (log buckets) or plain clamped distances, ``share_att_key``, ``norm_rel_ebd`` ``layer_norm``,
``position_biased_input``, token types, ``embedding_size != hidden_size`` (``embed_proj``) and the first-layer
convolution (``conv_kernel_size > 0``).

This module also holds :func:`strict_remap`, the key/shape-checked HF -> trimformer renaming shared with the
ModernBERT loader.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trimformer.layers.deberta import DebertaLayer, PackedConv
from trimformer.models.encoders.model import PackedEncoder
from trimformer.ops.activation import canonical_activation
from trimformer.ops.norm import add_layer_norm

_DEFAULTS = {
    "vocab_size": 128100,
    "hidden_size": 1536,
    "num_hidden_layers": 24,
    "num_attention_heads": 24,
    "intermediate_size": 6144,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "layer_norm_eps": 1e-7,
    "relative_attention": False,
    "max_relative_positions": -1,
    "pad_token_id": 0,
    "position_biased_input": True,
    "pos_att_type": None,
    "position_buckets": -1,
    "share_att_key": False,
    "norm_rel_ebd": "none",
    "conv_kernel_size": 0,
    "conv_groups": 1,
    "conv_act": "tanh",
}


@dataclass(frozen=True)
class DebertaV2Config:
    """Parsed DeBERTa-v2 configuration (HF ``DebertaV2Config`` keys; missing keys take HF's defaults).

    Besides the DeBERTa fields it exposes what :class:`trimformer.Encoder` reads from any encoder config:
    ``model_type``, ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``type_vocab_size``,
    ``position_offset`` (0), ``max_position_embeddings`` and :attr:`max_length`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    activation: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int | None
    embedding_size: int
    position_biased_input: bool
    relative_attention: bool
    c2p: bool
    p2c: bool
    position_buckets: int
    max_relative_positions: int
    share_att_key: bool
    norm_rel_embeddings: bool
    conv_kernel_size: int
    conv_groups: int
    conv_activation: str
    position_offset: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest sequence accepted: the tokenizers' limit ``max_position_embeddings`` (relative-only models
        would run longer ones, but were trained at this length)."""
        return self.max_position_embeddings

    @property
    def max_input_length(self) -> int | None:
        """Longest sequence the forward accepts: ``max_position_embeddings`` with absolute positions, else no limit
        (relative positions are log-bucketed or clamped to the span, so any length runs, as in HF)."""
        return self.max_position_embeddings if self.position_biased_input else None

    @property
    def position_span(self) -> int:
        """``span``: the relative embedding table has ``2 span`` rows (HF ``pos_ebd_size``)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions


def parse_config(d: dict[str, Any], model_type: str = "deberta-v2") -> DebertaV2Config:
    """Parse an HF ``config.json`` dict of a DeBERTa-v2/v3 model.

    Raises:
        ValueError: sizes that do not fit, an unknown ``pos_att_type`` entry, an ``attention_head_size`` that does
            not tile ``hidden_size``, a bad bucketing or conv setting, an unsupported activation.
    """
    g = lambda key: _DEFAULTS[key] if d.get(key) is None else d[key]  # noqa: E731
    hidden, heads = g("hidden_size"), g("num_attention_heads")
    for name, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_hidden_layers",
                        g("num_hidden_layers")), ("intermediate_size", g("intermediate_size")),
                        ("vocab_size", g("vocab_size"))):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{model_type} config: {name} must be a positive integer, got {value!r}")
    if hidden % heads:
        raise ValueError(f"{model_type} config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_size = d.get("attention_head_size")
    if head_size is not None and head_size * heads != hidden:
        raise ValueError(
            f"{model_type} config: attention_head_size {head_size} x {heads} heads != hidden_size {hidden} "
            "(the attention output projection is hidden x hidden)"
        )
    pos_att = g("pos_att_type") or []
    if isinstance(pos_att, str):
        pos_att = [x.strip() for x in pos_att.lower().split("|") if x.strip()]
    unknown = sorted(set(pos_att) - {"c2p", "p2c"})
    if unknown:
        raise ValueError(f"{model_type} config: pos_att_type {unknown} is not supported (only 'c2p' and 'p2c')")
    relative = bool(g("relative_attention"))
    max_rel = int(g("max_relative_positions"))
    if max_rel < 1:
        max_rel = int(g("max_position_embeddings"))
    buckets = int(g("position_buckets"))
    if relative and buckets > 0 and max_rel <= buckets // 2 + 1:
        raise ValueError(
            f"{model_type} config: position_buckets {buckets} needs max_relative_positions > {buckets // 2 + 1}, "
            f"got {max_rel}"
        )
    norm_rel = [x.strip() for x in str(g("norm_rel_ebd")).lower().split("|")]
    conv_k = int(g("conv_kernel_size"))
    if conv_k > 0 and conv_k % 2 == 0:
        raise ValueError(f"{model_type} config: conv_kernel_size must be odd (same-length convolution), got {conv_k}")
    act = g("hidden_act")
    canonical_activation(act)
    if conv_k > 0:
        canonical_activation(g("conv_act"))
    return DebertaV2Config(
        model_type=model_type,
        vocab_size=g("vocab_size"),
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=g("intermediate_size"),
        num_layers=g("num_hidden_layers"),
        activation=act,
        layer_norm_eps=float(g("layer_norm_eps")),
        max_position_embeddings=int(g("max_position_embeddings")),
        type_vocab_size=int(g("type_vocab_size")),
        pad_token_id=d.get("pad_token_id", _DEFAULTS["pad_token_id"]),
        embedding_size=int(d.get("embedding_size") or hidden),
        position_biased_input=bool(g("position_biased_input")),
        relative_attention=relative,
        c2p="c2p" in pos_att,
        p2c="p2c" in pos_att,
        position_buckets=buckets,
        max_relative_positions=max_rel,
        share_att_key=bool(g("share_att_key")),
        norm_rel_embeddings="layer_norm" in norm_rel,
        conv_kernel_size=max(conv_k, 0),
        conv_groups=int(g("conv_groups")),
        conv_activation=str(g("conv_act")),
    )


class DebertaV2Embeddings(nn.Module):
    """``LayerNorm(embed_proj(word[ids] + position[pos] + token_type[types]))`` on packed tokens.

    Parameters: ``word.weight [V, E]``, ``position.weight [P, E]`` (when ``position_biased_input``),
    ``token_type.weight [TV, E]`` (when ``type_vocab_size > 0``), ``project.weight [H, E]`` (when ``E != H``),
    ``norm.weight/bias [H]``.
    """

    def __init__(self, config: DebertaV2Config, *, impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        e, h = config.embedding_size, config.hidden_size
        self.impl, self.eps = impl, config.layer_norm_eps
        self.word = nn.Embedding(config.vocab_size, e, **kw)
        self.position = nn.Embedding(config.max_position_embeddings, e, **kw) if config.position_biased_input else None
        self.token_type = nn.Embedding(config.type_vocab_size, e, **kw) if config.type_vocab_size > 0 else None
        self.project = nn.Linear(e, h, bias=False, **kw) if e != h else None
        self.norm = nn.LayerNorm(h, eps=self.eps, **kw)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[T]`` int64 ids, local positions and optional segment ids -> ``[T, H]``."""
        x = F.embedding(input_ids, self.word.weight)
        if self.position is not None:
            x = x + F.embedding(position_ids, self.position.weight)
        if self.token_type is not None:
            types = self.token_type.weight[0] if token_type_ids is None else self.token_type.weight[token_type_ids]
            x = x + types
        if self.project is not None:
            x = F.linear(x, self.project.weight)
        return add_layer_norm(x, None, self.norm.weight, self.norm.bias, eps=self.eps, impl=self.impl)


class DebertaV2Model(PackedEncoder):
    """Padding-free DeBERTa-v2/v3 encoder with the forward interface of
    :class:`~trimformer.models.encoders.EncoderModel` (``forward_packed``, padded ``forward``, ``set_impl``).

    Parameters: ``embeddings`` (:class:`DebertaV2Embeddings`), ``layers`` (:class:`DebertaLayer`),
    ``rel_embeddings.weight [2 span, H]`` and ``rel_norm`` (when relative), ``conv`` (when ``conv_kernel_size``).
    """

    def __init__(self, config: DebertaV2Config, *, impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.embeddings = DebertaV2Embeddings(config, impl=impl, **kw)
        self.layers = nn.ModuleList(
            DebertaLayer(
                config.hidden_size,
                config.num_heads,
                config.intermediate_size,
                config.activation,
                config.layer_norm_eps,
                relative_attention=config.relative_attention,
                c2p=config.c2p,
                p2c=config.p2c,
                share_att_key=config.share_att_key,
                position_buckets=config.position_buckets,
                max_relative_positions=config.max_relative_positions,
                impl=impl,
                **kw,
            )  # fmt: skip
            for _ in range(config.num_layers)
        )
        rel = config.relative_attention
        self.rel_embeddings = nn.Embedding(2 * config.position_span, config.hidden_size, **kw) if rel else None
        self.rel_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw) if config.norm_rel_embeddings else None
        )
        self.conv = (
            PackedConv(
                config.hidden_size,
                config.conv_kernel_size,
                config.conv_groups,
                config.conv_activation,
                config.layer_norm_eps,
                impl=impl,
                **kw,
            )  # fmt: skip
            if config.conv_kernel_size > 0
            else None
        )
        self.impl = impl
        self._proj_cache: tuple[tuple, list] | None = None

    def position_projections(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per layer ``(Kr, Qr)`` ``[2 span, heads, head_dim]`` from the shared (normalised) relative embeddings.

        They depend on weights only, so they are cached until a parameter changes (tracked through the parameters'
        version counters and storages): 2 x layers GEMMs of ``[2 span, H] x [H, H]`` per forward otherwise.
        """
        if self.rel_embeddings is None:
            return [(None, None)] * len(self.layers)
        key = _weights_key(self)
        if key is not None and self._proj_cache is not None and self._proj_cache[0] == key:
            return self._proj_cache[1]
        rel = self.rel_embeddings.weight
        if self.rel_norm is not None:
            rel = add_layer_norm(rel, None, self.rel_norm.weight, self.rel_norm.bias, eps=self.rel_norm.eps,
                                 impl=self.impl)  # fmt: skip
        projections = [layer.position_projections(rel) for layer in self.layers]
        self._proj_cache = None if key is None or torch.is_grad_enabled() else (key, projections)
        return projections

    def encode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """The forward on raw packed tensors (what the engine's CUDA graphs capture): no validation, no host reads
        (the position projections and the relative-index table are cached by the warm-up runs).

        Args:
            input_ids: ``[T]`` int64; position_ids: ``[T]`` int64 local positions (absolute embeddings and the
                conv's sequence boundaries); token_type_ids: ``[T]`` or ``None``.
            cu_seqlens: ``[N + 1]`` int32; max_seqlen: an upper bound on every sequence's length (host int).

        Returns:
            ``[T, H]`` last hidden states.
        """
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        h = x
        for i, (layer, (kr, qr)) in enumerate(zip(self.layers, self.position_projections())):
            h = layer(h, cu_seqlens, max_seqlen, kr, qr)
            if i == 0 and self.conv is not None:
                h = self.conv(x, h, position_ids)
        return h


def _weights_key(model: nn.Module) -> tuple | None:
    """``(storage pointer, version)`` of every parameter, or ``None`` when versions are not tracked (parameters
    created under ``torch.inference_mode``)."""
    try:
        return tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in model.parameters())
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------------------------- HF weights

KeyMap = list[tuple[str, str]]


def strict_remap(
    state: Mapping[str, torch.Tensor],
    key_map: KeyMap,
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    prefix: str,
    ignored: re.Pattern[str],
    family: str,
    source: str,
) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to trimformer keys, strict about keys and shapes.

    Args:
        state: HF tensors of a bare base model, or of a task model whose base-model keys start with ``prefix``
            (its other keys, task heads, are set aside).
        key_map: ``[(our_key, hf_key)]`` covering every parameter of the model.
        expected_shapes: ``{our_key: shape}`` of the model.
        prefix: the task models' base-model prefix with its dot (``"deberta."``, ``"model."``).
        ignored: base-model keys HF writes that the packed model does not use (buffers, unused tables).
        family, source: named in error messages.

    Returns:
        ``{our_key: tensor}``.

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches (HF names).
    """
    anchor = key_map[0][1]
    has_prefix = anchor not in state and (prefix + anchor) in state
    base = {}
    for key, value in state.items():
        if has_prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix) :]
        if not ignored.match(key):
            base[key] = value
    expected = {theirs: tuple(expected_shapes[ours]) for ours, theirs in key_map}
    missing = sorted(k for k in expected if k not in base)
    unexpected = sorted(k for k in base if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(base[k].shape)} vs expected {expected[k]}"
        for k in expected
        if k in base and tuple(base[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        fmt = lambda keys: ", ".join(keys[:12]) + (f", ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")  # noqa: E731
        problems = [
            f"{what} ({len(keys)}): {fmt(keys)}"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )  # fmt: skip
            if keys
        ]
        raise ValueError(f"{source} does not match its {family} config: " + "; ".join(problems))
    return {ours: base[theirs] for ours, theirs in key_map}


def hf_key_map(model: DebertaV2Model) -> KeyMap:
    """``[(our_key, hf_key)]`` for every parameter of ``model`` (fused Q/K/V listed by :func:`_fused_qkv`)."""
    fixed = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.project.weight": "embeddings.embed_proj.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        "rel_embeddings.weight": "encoder.rel_embeddings.weight",
        "rel_norm.weight": "encoder.LayerNorm.weight",
        "rel_norm.bias": "encoder.LayerNorm.bias",
        "conv.conv.weight": "encoder.conv.conv.weight",
        "conv.conv.bias": "encoder.conv.conv.bias",
        "conv.norm.weight": "encoder.conv.LayerNorm.weight",
        "conv.norm.bias": "encoder.conv.LayerNorm.bias",
    }
    layer = {
        "pos_key": "attention.self.pos_key_proj",
        "pos_query": "attention.self.pos_query_proj",
        "out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
    }
    pairs: KeyMap = []
    for name, _ in model.named_parameters():
        if name in fixed:
            pairs.append((name, fixed[name]))
            continue
        _, i, module, param = name.split(".")  # layers.<i>.<module>.<param>
        if module == "qkv":
            pairs += [(f"{name}#{j}", f"encoder.layer.{i}.attention.self.{p}.{param}")
                      for j, p in enumerate(("query_proj", "key_proj", "value_proj"))]  # fmt: skip
        else:
            pairs.append((name, f"encoder.layer.{i}.{layer[module]}.{param}"))
    return pairs


def _split_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes, with each fused ``qkv`` tensor listed as three ``#j`` thirds."""
    shapes = {}
    for name, p in model.named_parameters():
        if name.split(".")[-2:-1] == ["qkv"]:
            for j in range(3):
                shapes[f"{name}#{j}"] = (p.shape[0] // 3, *p.shape[1:])
        else:
            shapes[name] = tuple(p.shape)
    return shapes


def fuse_qkv(mapped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate the ``<name>#0/1/2`` (query, key, value) tensors into ``<name>``."""
    out = {}
    for key, value in mapped.items():
        if "#" not in key:
            out[key] = value
        elif key.endswith("#0"):
            stem = key[:-2]
            out[stem] = torch.cat([mapped[f"{stem}#{j}"] for j in range(3)], dim=0)
    return out


_IGNORED = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")


def load(
    path: str | Path, config: DebertaV2Config, *, device: torch.device, dtype: torch.dtype, impl: str = "auto"
) -> DebertaV2Model:
    """Build a :class:`DebertaV2Model` from a local HF folder (strict keys/shapes), in eval mode.

    HF's own loader ignores a stray ``embeddings.position_embeddings`` table when ``position_biased_input`` is off
    (``_keys_to_ignore_on_load_unexpected``); so does this one.
    """
    from trimformer.models.encoders.loading import read_state_dict

    shell = DebertaV2Model(config, impl=impl, device="meta")
    ignored = _IGNORED
    if not config.position_biased_input:
        ignored = re.compile(r"^(embeddings\.position_ids|pooler\..*|embeddings\.position_embeddings\.weight)$")
    mapped = strict_remap(
        read_state_dict(path), hf_key_map(shell), _split_shapes(shell), prefix="deberta.", ignored=ignored,
        family=config.model_type, source=f"checkpoint in {str(path)!r}",
    )  # fmt: skip
    state = {k: v.to(device=device, dtype=dtype) for k, v in fuse_qkv(mapped).items()}
    shell.load_state_dict(state, strict=True, assign=True)
    return shell.eval().requires_grad_(False)
