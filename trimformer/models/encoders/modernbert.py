"""ModernBERT (``model_type`` ``"modernbert"``) on the padding-free path: config, strict HF loading, model.

Unpadded end to end: embeddings + LayerNorm on packed tokens, RoPE at each token's position inside its sequence,
global layers and sliding-window (local) layers in the varlen attention kernel (``window=(w, w)`` with
``w = local_attention // 2``: HF's ``|i - j| <= sliding_window``), GeGLU MLP, final LayerNorm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trimformer.layers.modernbert import ModernBertLayer
from trimformer.models.encoders.deberta_v2 import KeyMap, strict_remap
from trimformer.models.encoders.model import PackedEncoder
from trimformer.ops.activation import canonical_activation
from trimformer.ops.norm import add_layer_norm
from trimformer.ops.rope import rotary_cos_sin

_DEFAULTS = {
    "vocab_size": 50368,
    "hidden_size": 768,
    "intermediate_size": 1152,
    "num_hidden_layers": 22,
    "num_attention_heads": 12,
    "hidden_activation": "gelu",
    "max_position_embeddings": 8192,
    "norm_eps": 1e-5,
    "norm_bias": False,
    "pad_token_id": 50283,
    "attention_bias": False,
    "local_attention": 128,
    "mlp_bias": False,
    "global_attn_every_n_layers": 3,
    "global_rope_theta": 160_000.0,
    "local_rope_theta": 10_000.0,
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModernBertConfig:
    """Parsed ModernBERT configuration (HF ``ModernBertConfig``, old and new ``config.json`` layouts).

    Attributes beyond the sizes: ``layer_types`` (``"full_attention"`` / ``"sliding_attention"`` per layer),
    ``window`` (half-width of the local layers), ``global_rope_theta`` / ``local_rope_theta``, the bias flags.
    ``type_vocab_size`` is 0 and ``position_offset`` 0, as :class:`trimformer.Encoder` expects.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    activation: str
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    max_position_embeddings: int
    pad_token_id: int | None
    layer_types: tuple[str, ...]
    window: int
    global_rope_theta: float
    local_rope_theta: float
    type_vocab_size: int = 0
    position_offset: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def layer_norm_eps(self) -> float:
        return self.norm_eps


def _rope_theta(d: dict[str, Any], layer_type: str, legacy_key: str) -> float:
    params = (d.get("rope_parameters") or {}).get(layer_type) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"modernbert config: rope_type {rope_type!r} for {layer_type} is not supported ('default')")
    theta = params.get("rope_theta")
    if theta is None:
        theta = d.get(legacy_key)
    if theta is None and legacy_key == "local_rope_theta" and legacy_key in d:
        theta = _rope_theta(d, "full_attention", "global_rope_theta")  # old HF: local None -> global theta
    return float(_DEFAULTS[legacy_key] if theta is None else theta)


def parse_config(d: dict[str, Any], model_type: str = "modernbert") -> ModernBertConfig:
    """Parse an HF ``config.json`` dict of a ModernBERT model.

    Raises:
        ValueError: bad sizes, unknown layer types, non-default RoPE scaling, an unsupported activation.
    """
    g = lambda key: _DEFAULTS[key] if d.get(key) is None else d[key]  # noqa: E731
    hidden, heads, layers = g("hidden_size"), g("num_attention_heads"), g("num_hidden_layers")
    for name, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_hidden_layers", layers),
                        ("intermediate_size", g("intermediate_size")), ("vocab_size", g("vocab_size"))):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{model_type} config: {name} must be a positive integer, got {value!r}")
    if hidden % heads:
        raise ValueError(f"{model_type} config: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if (hidden // heads) % 2:
        raise ValueError(f"{model_type} config: head dim {hidden // heads} must be even for RoPE")
    layer_types = d.get("layer_types")
    if layer_types is None:
        every = int(g("global_attn_every_n_layers"))
        layer_types = ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
    layer_types = tuple(layer_types)
    if len(layer_types) != layers or set(layer_types) - set(_LAYER_TYPES):
        raise ValueError(
            f"{model_type} config: layer_types must list {layers} entries from {_LAYER_TYPES}, got {layer_types}"
        )
    local = int(g("local_attention"))
    if local < 0:
        raise ValueError(f"{model_type} config: local_attention must be >= 0, got {local}")
    act = g("hidden_activation")
    canonical_activation(act)
    return ModernBertConfig(
        model_type=model_type,
        vocab_size=g("vocab_size"),
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=g("intermediate_size"),
        num_layers=layers,
        activation=act,
        norm_eps=float(g("norm_eps")),
        norm_bias=bool(g("norm_bias")),
        attention_bias=bool(g("attention_bias")),
        mlp_bias=bool(g("mlp_bias")),
        max_position_embeddings=int(g("max_position_embeddings")),
        pad_token_id=d.get("pad_token_id", _DEFAULTS["pad_token_id"]),
        layer_types=layer_types,
        window=local // 2,
        global_rope_theta=_rope_theta(d, "full_attention", "global_rope_theta"),
        local_rope_theta=_rope_theta(d, "sliding_attention", "local_rope_theta"),
    )


class ModernBertEmbeddings(nn.Module):
    """``LayerNorm(word[ids])``. Parameters: ``word.weight [V, H]``, ``norm.weight [H]`` (+ ``norm.bias``)."""

    def __init__(self, config: ModernBertConfig, *, impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.impl, self.eps = impl, config.norm_eps
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.norm = nn.LayerNorm(config.hidden_size, eps=self.eps, bias=config.norm_bias, **kw)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[T]`` int64 -> ``[T, H]``."""
        x = F.embedding(input_ids, self.word.weight)
        return add_layer_norm(x, None, self.norm.weight, self.norm.bias, eps=self.eps, impl=self.impl)


class ModernBertModel(PackedEncoder):
    """Padding-free ModernBERT with the forward interface of :class:`~trimformer.models.encoders.EncoderModel`.

    Parameters: ``embeddings``, ``layers`` (:class:`~trimformer.layers.modernbert.ModernBertLayer`),
    ``final_norm``.
    """

    def __init__(self, config: ModernBertConfig, *, impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.embeddings = ModernBertEmbeddings(config, impl=impl, **kw)
        self.layers = nn.ModuleList(
            ModernBertLayer(
                config.hidden_size,
                config.num_heads,
                config.intermediate_size,
                config.activation,
                config.norm_eps,
                norm_bias=config.norm_bias,
                attention_bias=config.attention_bias,
                mlp_bias=config.mlp_bias,
                window=config.window if kind == "sliding_attention" else None,
                first=i == 0,
                impl=impl,
                **kw,
            )  # fmt: skip
            for i, kind in enumerate(config.layer_types)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias, **kw)
        self.impl = impl

    def encode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """The forward on raw packed tensors (what the engine's CUDA graphs capture): no validation, no host reads.

        Args:
            input_ids: ``[T]`` int64; position_ids: ``[T]`` int64 local positions (RoPE); token_type_ids: ignored
                (ModernBERT has no segments).
            cu_seqlens: ``[N + 1]`` int32; max_seqlen: an upper bound on every sequence's length (host int).

        Returns:
            ``[T, H]`` last hidden states.
        """
        cfg = self.config
        h = self.embeddings(input_ids)
        rope = {
            kind: rotary_cos_sin(position_ids, cfg.head_dim, theta)
            for kind, theta in (("full_attention", cfg.global_rope_theta), ("sliding_attention", cfg.local_rope_theta))
            if kind in cfg.layer_types
        }
        for layer, kind in zip(self.layers, cfg.layer_types):
            h = layer(h, cu_seqlens, max_seqlen, *rope[kind])
        return add_layer_norm(h, None, self.final_norm.weight, self.final_norm.bias, eps=cfg.norm_eps, impl=self.impl)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Padded ``[B, S]`` in (right or left padding), ``[B, S, H]`` out with zeros at padding.
        ``token_type_ids`` is accepted for interface parity and must be ``None`` or all zeros (no segments)."""
        if token_type_ids is not None and bool((token_type_ids != 0).any()):
            raise ValueError("modernbert has no token types; pass token_type_ids=None")
        return super().forward(input_ids, attention_mask)


def hf_key_map(model: ModernBertModel) -> KeyMap:
    """``[(our_key, hf_key)]`` for every parameter of ``model``."""
    rename = {"word": "tok_embeddings", "qkv": "attn.Wqkv", "out": "attn.Wo", "ffn_in": "mlp.Wi", "ffn_out": "mlp.Wo"}
    pairs: KeyMap = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "layers":
            parts[2] = rename.get(parts[2], parts[2])
        elif parts[0] == "embeddings":
            parts[1] = rename.get(parts[1], parts[1])
        pairs.append((name, ".".join(parts)))
    return pairs


_IGNORED = re.compile(r"^$")


def load(
    path: str | Path, config: ModernBertConfig, *, device: torch.device, dtype: torch.dtype, impl: str = "auto"
) -> ModernBertModel:
    """Build a :class:`ModernBertModel` from a local HF folder (strict keys/shapes; task heads outside the
    ``model.`` prefix are set aside), in eval mode."""
    from trimformer.models.encoders.loading import read_state_dict

    shell = ModernBertModel(config, impl=impl, device="meta")
    mapped = strict_remap(
        read_state_dict(path), hf_key_map(shell), {k: tuple(v.shape) for k, v in shell.named_parameters()},
        prefix="model.", ignored=_IGNORED, family=config.model_type, source=f"checkpoint in {str(path)!r}",
    )  # fmt: skip
    state = {k: v.to(device=device, dtype=dtype) for k, v in mapped.items()}
    shell.load_state_dict(state, strict=True, assign=True)
    return shell.eval().requires_grad_(False)
