"""Compressed Convolutional Attention (CCA / CCGQA) layer, the shared attention config and the shared forward.

Every attention layer of trimformer (:class:`CCAttention` here; MHA, GQA and MLA in ``baselines.py``) has one
signature::

    y = layer(x, *, attention_mask=None, cu_seqlens=None, max_seqlen=None, cache=None, layer_idx=0)

* dense ``x [B, S, E]`` with an optional ``attention_mask [B, S]`` (1 = token, 0 = padding, usually on the left;
  padding rows of ``y`` are 0), or packed ``x [T, E]`` with ``cu_seqlens [N + 1]`` int32 and ``max_seqlen`` (host
  int). Positions restart at every sequence/document (position 0 = first real token) and nothing leaks between
  packed documents. A dense mask is turned into packed form once (this reads the mask on the host).
* ``cache``: an :class:`~trimformer.layers.cache.AttentionCache`; the layer appends its new tokens to
  ``cache.layers[layer_idx]`` (in place) and attends over everything cached. With packed input, document ``i``
  continues cache row ``i`` (so ``N == B``; empty documents allowed). Dense ``[B, 1, E]`` input without a mask takes
  the decode path: static shapes and no host sync, so it can be captured in a CUDA graph.

The CCA math follows ``cca-spec.md`` sections 1-2 (see ``trimformer/ops/cca``); attention goes through
``trimformer.ops.attention`` (``varlen_attention`` without a cache, ``kvcache_attention`` with one).

``impl`` (every layer): ``"auto"`` runs our Triton kernels on CUDA (fused CCA prologue, varlen flash attention,
flash-decoding) and PyTorch elsewhere; for dense input without a mask, CCA/CCGQA layers run the latent attention core
on the fastest of our flash kernel and PyTorch's SDPA backends for that shape, measured once and cached
(``trimformer.ops.cca.core``; ``layer.core_backend`` names the core that ran); ``"triton"`` insists on our kernels
(a ``ValueError`` on unsupported input); ``"torch"`` uses PyTorch only: for dense input without a mask on CUDA the core
is ``F.scaled_dot_product_attention`` (whichever SDPA backend is enabled: ``torch.nn.attention.sdpa_kernel`` selects
flash, cuDNN or efficient), otherwise ``varlen_attn``; ``"naive"`` runs the plain references.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trimformer.layers.cache import AttentionCache, CCACacheLayer
from trimformer.ops.attention import kvcache_attention, varlen_attention
from trimformer.ops.cca import TEMPERATURE_MODES, cca_decode_prologue, cca_prologue
from trimformer.ops.cca.core import dense_core_attention, pick_dense_core
from trimformer.ops.rope import rotary_cos_sin

ATTENTION_KINDS = ("mha", "gqa", "mla", "cca", "ccgqa")
LAYER_IMPLS = ("auto", "triton", "torch", "naive")
FUSED_PROJECTION_MIN_ROWS = 128  # CCA/CCGQA (H100, d_h 128, B 1): one GEMM 1.02-1.17x faster from 128 rows to 16k


@dataclass
class AttentionConfig:
    """Plain, JSON-serialisable description of one attention layer (embed it in an HF ``PretrainedConfig``).

    Attributes:
        kind: ``"mha"``, ``"gqa"``, ``"mla"``, ``"cca"`` or ``"ccgqa"``.
        hidden_size: ``E``.
        num_heads: query heads (latent query heads ``h_q`` for CCA/CCGQA).
        num_kv_heads: key/value heads; ``== num_heads`` for MHA and CCA, a divisor for GQA and CCGQA; unused by MLA.
        head_dim: ``d_h`` (for MLA: the non-RoPE query/key dim and the value dim per head).
        bias: biases on the linear projections (MLA, as DeepSeek: on q_a_proj, kv_a_proj and o_proj only).
        rope_theta: RoPE base.
        rope_fraction: fraction of ``head_dim`` rotated (NeoX rotate-half on the first dims; the rest is NoPE).
            ``int(head_dim * rope_fraction)`` must be even. MLA rotates its decoupled key/query dims fully instead.
        conv_kernel_seq, conv_kernel_ch: ``k_seq`` (depthwise conv) and ``k_ch`` (head-wise grouped conv).
        num_convs: 2 (depthwise then grouped), 1 (the depthwise conv only) or 0 (no convolution): the ablation.
        conv_bias: biases on the convolutions (ZAYA1: yes).
        qk_mean: the pre-conv q-k mean skip connection.
        value_shift: half of the kv heads read the previous token's value projection.
        temperature_mode: key temperature ``beta = T`` (``"linear"``, ZAYA1) or ``exp(T)`` (``"exp"``, the paper).
        kv_lora_rank: MLA KV latent width ``r`` (``E / c_kv``; the cache holds ``r + rope_head_dim`` per token).
        q_lora_rank: MLA query latent width (``E / c_q``); 0 = full-rank query projection.
        rope_head_dim: MLA decoupled RoPE query/key dim per head (the key is shared across heads).
        init_std: std of the normal initialisation of the projections.

    Defaults are ZAYA1's attention (CCGQA 8 query / 2 kv latent heads of 128 at E = 2048, kernels 2 and 2, linear
    temperature, half the head dims rotated) with a RoPE base of 10,000.
    """

    kind: str = "ccgqa"
    hidden_size: int = 2048
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 128
    bias: bool = False
    rope_theta: float = 10000.0
    rope_fraction: float = 0.5
    conv_kernel_seq: int = 2
    conv_kernel_ch: int = 2
    num_convs: int = 2
    conv_bias: bool = True
    qk_mean: bool = True
    value_shift: bool = True
    temperature_mode: str = "linear"
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    rope_head_dim: int = 64
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {self.kind!r}")
        for name in ("hidden_size", "num_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        hq, hk = self.num_heads, self.num_kv_heads
        if self.kind != "mla":
            if not isinstance(hk, int) or hk < 1 or hq % hk:
                raise ValueError(f"num_heads ({hq}) must be a multiple of num_kv_heads ({hk})")
            if self.kind in ("mha", "cca") and hq != hk:
                raise ValueError(f"{self.kind} needs num_kv_heads == num_heads, got {hk} and {hq}")
            if self.rotary_dim % 2 or not 0.0 <= self.rope_fraction <= 1.0:
                raise ValueError(
                    f"rope_fraction must be in [0, 1] with int(head_dim * rope_fraction) even, got {self.rope_fraction}"
                )
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.kind in ("cca", "ccgqa"):
            if self.conv_kernel_seq < 1 or self.conv_kernel_ch < 1:
                raise ValueError(f"conv kernel sizes must be >= 1, got {self.conv_kernel_seq}, {self.conv_kernel_ch}")
            if self.num_convs not in (0, 1, 2):
                raise ValueError(f"num_convs must be 0, 1 or 2, got {self.num_convs}")
            if self.temperature_mode not in TEMPERATURE_MODES:
                raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {self.temperature_mode!r}")
            if self.kv_width % 2:
                raise ValueError(f"num_kv_heads * head_dim must be even (two value halves), got {self.kv_width}")
        if self.kind == "mla":
            if self.kv_lora_rank < 1:
                raise ValueError("mla needs kv_lora_rank >= 1 (e.g. hidden_size // 2 for the paper's 4x KV cache)")
            if self.q_lora_rank < 0 or self.rope_head_dim < 2 or self.rope_head_dim % 2:
                raise ValueError(
                    f"mla needs q_lora_rank >= 0 and an even rope_head_dim >= 2, got {self.q_lora_rank}, "
                    f"{self.rope_head_dim}"
                )

    @property
    def q_width(self) -> int:
        """``Cq = num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """``Ck = num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per head (``int(head_dim * rope_fraction)``)."""
        return int(self.head_dim * self.rope_fraction)

    @property
    def conv_channels(self) -> int:
        """``C = Cq + Ck`` channels through the convolutions."""
        return self.q_width + self.kv_width

    @property
    def conv_padding(self) -> int:
        """``P``: rows of left context the convolutions need (the conv state width)."""
        if self.kind not in ("cca", "ccgqa") or self.num_convs == 0:
            return 0
        return (self.conv_kernel_seq - 1) + ((self.conv_kernel_ch - 1) if self.num_convs == 2 else 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown AttentionConfig fields: {sorted(unknown)}")
        return cls(**data)


@dataclass
class _Packed:
    """A forward's tokens in packed form and how to put the result back into the caller's layout."""

    x: torch.Tensor  # [T, E]
    cu_seqlens: torch.Tensor  # [N + 1] int32
    max_seqlen: int
    shape: tuple[int, ...]  # caller's leading dims
    indices: torch.Tensor | None  # [T] flat positions of real tokens in a masked dense input
    decode: bool
    dense: tuple[int, int] | None = None  # (B, S) when every sequence has S tokens (dense input without a mask)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        if self.indices is None:
            return y.reshape(*self.shape, y.shape[-1])
        out = y.new_zeros(math.prod(self.shape), y.shape[-1])
        out[self.indices] = y
        return out.reshape(*self.shape, y.shape[-1])


@dataclass
class _CachePlan:
    """Where the packed tokens of a cached forward go: cache row, position (= cache column), dense query slot."""

    cu_seqlens: torch.Tensor  # [B + 1] int32
    rows: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64 column in the right-aligned [B, W] query layout
    new_seqlens: torch.Tensor  # [B] int32
    width: int
    decode: bool


def token_rows(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [T], offsets [T], lengths [N])`` int64: sequence and in-sequence offset of each packed token."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=num_tokens)
    return rows, torch.arange(num_tokens, device=cu.device) - cu[rows], lengths


class AttentionBase(nn.Module, ABC):
    """Input handling shared by every attention layer; subclasses implement ``_forward_packed``/``_forward_cached``.

    ``sdpa_expand_kv``: on the ``impl="torch"`` SDPA route, copy grouped key/value heads up to the query heads
    instead of passing ``enable_gqa`` (some SDPA backends only take equal head counts; benchmarks try both).
    """

    sdpa_expand_kv: bool = False
    dense_core_routing: bool = False  # impl="auto": measure SDPA against our kernel for dense input (see _attend)
    core_backend: str | None = None
    fused_projection_min_rows: int | None = None  # see _project; None: always one nn.Linear per projection

    def __init__(self, config: AttentionConfig, impl: str = "auto") -> None:
        super().__init__()
        if impl not in LAYER_IMPLS:
            raise ValueError(f"impl must be one of {LAYER_IMPLS}, got {impl!r}")
        self.config = config
        self.impl = impl

    def forward(
        self,
        x: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: AttentionCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """Attention over dense ``[B, S, E]`` (optional ``attention_mask [B, S]``) or packed ``[T, E]`` input.

        Args:
            x: hidden states, dense or packed.
            attention_mask: ``[B, S]`` bool/int (1 = token) for dense input only.
            cu_seqlens: ``[N + 1]`` int32 for packed input (default: one sequence).
            max_seqlen: longest packed sequence, host int (computed from ``cu_seqlens`` if omitted: a host read).
            cache: decode cache; ``cache.layers[layer_idx]`` is read and advanced in place.
            layer_idx: this layer's entry in ``cache``.

        Returns:
            ``y`` in the layout of ``x`` (zeros at padding positions).
        """
        p = self._pack(x, attention_mask, cu_seqlens, max_seqlen, cache)
        if p.x.shape[0] == 0:  # no real token anywhere: nothing to compute, nothing to cache
            return p.restore(p.x)
        if cache is None:
            _, offsets, _ = token_rows(p.cu_seqlens, p.x.shape[0])
            y = self._forward_packed(p.x, p.cu_seqlens, p.max_seqlen, offsets, p.dense)
        else:
            if not isinstance(cache, AttentionCache) or not 0 <= layer_idx < len(cache.layers):
                raise ValueError(f"cache must be an AttentionCache holding layer_idx={layer_idx}")
            state = cache.layers[layer_idx]
            self._check_cache(state, p)
            y = self._forward_cached(p.x, self._plan(p, state), state)
        return p.restore(y)

    def _pack(self, x, attention_mask, cu_seqlens, max_seqlen, cache) -> _Packed:
        e = self.config.hidden_size
        if x.shape[-1] != e or x.dim() not in (2, 3):
            raise ValueError(f"x must be [B, S, {e}] or [T, {e}], got {tuple(x.shape)}")
        if x.dim() == 3:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens is for packed [T, E] input; dense input takes attention_mask")
            b, s, _ = x.shape
            if attention_mask is None:
                cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * s
                return _Packed(x.reshape(b * s, e), cu, s, (b, s), None, cache is not None and s == 1, (b, s))
            if attention_mask.shape != (b, s):
                raise ValueError(f"attention_mask must be [B, S] = [{b}, {s}], got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=x.device, dtype=torch.bool)
            lengths = mask.sum(1)
            indices = mask.reshape(-1).nonzero().squeeze(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            return _Packed(x.reshape(b * s, e)[indices], cu, int(lengths.max()), (b, s), indices, False)
        if attention_mask is not None:
            raise ValueError("attention_mask is for dense [B, S, E] input; packed input takes cu_seqlens")
        t = x.shape[0]
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, t], dtype=torch.int32, device=x.device)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be 1-D int32 [N + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
        n = cu_seqlens.numel() - 1
        dense = (1, t) if n == 1 and max_seqlen == t else None
        return _Packed(x, cu_seqlens, max_seqlen, (t,), None, cache is not None and max_seqlen == 1 and t == n, dense)

    def _check_cache(self, state, p: _Packed) -> None:
        n = p.cu_seqlens.numel() - 1
        if n != state.batch_size:
            raise ValueError(f"the input holds {n} sequences but the cache has {state.batch_size} rows")
        if state.dtype != p.x.dtype:
            raise ValueError(
                f"the cache is {state.dtype} but the activations are {p.x.dtype}; allocate it in that dtype"
            )

    def _plan(self, p: _Packed, state) -> _CachePlan:
        t = p.x.shape[0]
        state.reserve(p.max_seqlen)
        start = state.seqlens.to(torch.long)
        if p.decode:
            rows = torch.arange(t, device=p.x.device)
            return _CachePlan(p.cu_seqlens, rows, start, torch.zeros_like(rows), (start + 1).to(torch.int32), 1, True)
        rows, offsets, lengths = token_rows(p.cu_seqlens, t)
        slots = p.max_seqlen - lengths[rows] + offsets
        new_seqlens = (start + lengths).to(torch.int32)
        return _CachePlan(p.cu_seqlens, rows, start[rows] + offsets, slots, new_seqlens, p.max_seqlen, False)

    def _project(self, x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
        """``lin(x)`` for each of ``linears`` on the same ``x [T, E]``.

        From ``fused_projection_min_rows`` rows on, one GEMM over the weights concatenated per call (one launch instead
        of several narrow ones; in training one input-gradient GEMM instead of a sum of several): the outputs are then
        column views ``[T, out_i]`` of one ``[T, sum out_i]`` result. Below it (decode steps), when it is ``None``, or
        with mixed biases (some ``None``), every ``nn.Linear`` runs alone. The copy of the weights is what the fused
        GEMM costs: it pays for CCA's narrow latent projections, not for MHA's ``3 E^2`` weights (measured in
        ``ops/cca/NOTES.md`` v9), so only :class:`CCAttention` sets a threshold by default.
        """
        biases = [lin.bias for lin in linears]
        rows = self.fused_projection_min_rows
        if rows is None or x.shape[0] < rows or len({b is None for b in biases}) > 1:
            return tuple(lin(x) for lin in linears)
        weight = torch.cat([lin.weight for lin in linears])
        bias = None if biases[0] is None else torch.cat(biases)
        return F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)

    def _cos_sin(self, positions: torch.Tensor, rotary_dim: int, dtype: torch.dtype):
        if rotary_dim == 0:
            return None, None
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return rotary_cos_sin(positions, rotary_dim, self.config.rope_theta, dtype=wide)

    def _cached_attention(self, q, k_cache, v_cache, plan: _CachePlan, scale: float) -> torch.Tensor:
        """Attention of the packed queries ``q [T, H, D]`` over a cache; returns ``[T, H, D]``."""
        if plan.decode:
            qd = q[:, None]
        else:
            qd = q.new_zeros(k_cache.shape[0], plan.width, *q.shape[1:])
            qd[plan.rows, plan.slots] = q
        out = kvcache_attention(qd, k_cache, v_cache, plan.new_seqlens, scale=scale, impl=self.impl)
        return out[:, 0] if plan.decode else out[plan.rows, plan.slots]

    def _attend(self, q, k, v, cu_seqlens, max_seqlen, scale: float, dense) -> torch.Tensor:
        """Causal attention of packed ``q [T, Hq, D]``, ``k [T, Hk, D]``, ``v [T, Hk, Dv]`` -> ``[T, Hq, Dv]``.

        ``dense = (B, S)`` (every sequence has ``S`` tokens) lets ``impl="torch"`` on CUDA call SDPA on
        ``[B, H, S, D]`` views, and ``impl="auto"`` on CUDA (layers with ``dense_core_routing``) run the core on the
        fastest of our kernel and the SDPA backends for that shape (:func:`trimformer.ops.cca.core.pick_dense_core`,
        measured once per shape and cached); every other case goes through :func:`varlen_attention` (``v``
        zero-padded to ``D`` when ``Dv < D``, the padding dropped from the output). ``self.core_backend`` records
        which core ran last (``"triton"``, ``"torch"``, ``"naive"`` or the SDPA choice, e.g. ``"sdpa-cudnn"``).
        """
        t, hq, dv = q.shape[0], q.shape[1], v.shape[-1]
        if dense is not None and self.impl == "torch" and q.is_cuda:
            b, s = dense
            gqa = k.shape[1] != hq
            if gqa and self.sdpa_expand_kv:
                k, v = (x.repeat_interleave(hq // k.shape[1], dim=1) for x in (k, v))
                gqa = False
            qd, kd, vd = (x.reshape(b, s, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
            self.core_backend = "torch"
            return o.transpose(1, 2).reshape(t, hq, dv)
        if dense is not None and self.impl == "auto" and self.dense_core_routing and dv == q.shape[-1]:
            train = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            choice = pick_dense_core(q, k, dense, train)
            if choice.is_sdpa:
                self.core_backend = choice.name
                return dense_core_attention(q, k, v, dense, scale, choice)
        self.core_backend = ("triton" if q.is_cuda else "torch") if self.impl == "auto" else self.impl
        if dv < q.shape[-1]:  # the attention op takes one head dim for k and v: zero-pad v, drop later
            o = varlen_attention(q, k, F.pad(v, (0, q.shape[-1] - dv)), cu_seqlens, max_seqlen, causal=True,
                                 scale=scale, impl=self.impl)  # fmt: skip
            return o[..., :dv]
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=scale, impl=self.impl)

    @abstractmethod
    def _forward_packed(self, x, cu_seqlens, max_seqlen, positions, dense=None) -> torch.Tensor:
        """Packed ``x [T, E]`` without a cache; ``positions [T]`` restart per sequence; ``dense = (B, S)`` when all
        sequences have the same length. Returns ``[T, E]``."""

    @abstractmethod
    def _forward_cached(self, x, plan: _CachePlan, state) -> torch.Tensor:
        """Packed ``x [T, E]`` appended to the cache entry ``state`` as ``plan`` says. Returns ``[T, E]``."""

    def extra_repr(self) -> str:
        c = self.config
        return f"kind={c.kind}, hidden_size={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}x{c.head_dim}"


class CCAttention(AttentionBase):
    """CCA (``num_heads == num_kv_heads``) and CCGQA attention in a compressed latent space (``cca-spec.md``).

    Parameters: ``q_proj [Cq, E]``, ``k_proj [Ck, E]``, ``v_proj_current [Ck/2, E]``, ``v_proj_delayed [Ck/2, E]``,
    ``o_proj [E, Cq]`` (``nn.Linear``, biases when ``config.bias``); ``conv1_weight [C, k_seq]`` and
    ``conv1_bias [C]`` (depthwise, when ``num_convs >= 1``); ``conv2_weight [C, d_h, k_ch]`` and ``conv2_bias [C]``
    (head-wise grouped, when ``num_convs == 2``; conv biases when ``config.conv_bias``); ``temperature [h_k]``.

    ``impl``: ``"auto"`` runs the fused Triton prologue (``trimformer.ops.cca``) on CUDA and, for dense input, the
    attention core on whichever of our Triton flash kernel and PyTorch's SDPA backends (cuDNN, flash) measured
    fastest for the shape (``core_backend`` says which ran), our kernel for packed input; ``"triton"`` insists on
    our kernels, ``"torch"`` runs the vectorised PyTorch prologue and PyTorch attention, ``"naive"``
    the reference ops (see the module docstring).
    """

    dense_core_routing = True
    fused_projection_min_rows = FUSED_PROJECTION_MIN_ROWS

    def __init__(self, config: AttentionConfig, *, impl: str = "auto", device=None, dtype=None) -> None:
        if config.kind not in ("cca", "ccgqa"):
            raise ValueError(f"CCAttention needs kind 'cca' or 'ccgqa', got {config.kind!r}")
        super().__init__(config, impl)
        kw = {"device": device, "dtype": dtype}
        e, cq, ck, c = config.hidden_size, config.q_width, config.kv_width, config.conv_channels
        self.q_proj = nn.Linear(e, cq, bias=config.bias, **kw)
        self.k_proj = nn.Linear(e, ck, bias=config.bias, **kw)
        self.v_proj_current = nn.Linear(e, ck // 2, bias=config.bias, **kw)
        self.v_proj_delayed = nn.Linear(e, ck // 2, bias=config.bias, **kw)
        self.o_proj = nn.Linear(cq, e, bias=config.bias, **kw)
        with_bias = lambda n: nn.Parameter(torch.empty(n, **kw)) if config.conv_bias else None
        one, two = config.num_convs >= 1, config.num_convs == 2
        self.conv1_weight = nn.Parameter(torch.empty(c, config.conv_kernel_seq, **kw)) if one else None
        self.conv1_bias = with_bias(c) if one else None
        self.conv2_weight = nn.Parameter(torch.empty(c, config.head_dim, config.conv_kernel_ch, **kw)) if two else None
        self.conv2_bias = with_bias(c) if two else None
        self.temperature = nn.Parameter(torch.empty(config.num_kv_heads, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise for training from scratch.

        Projections ~ N(0, ``init_std``), biases 0. Convolutions start as the identity ("delta"): the depthwise conv
        has weight 1 on the current token, the grouped conv the identity matrix on the current tap, biases 0; so at
        step 0 the layer is QK-normed GQA on the latents plus the qk-mean skip, and training moves the other taps
        away from 0. Temperature starts at ``beta = 1`` (``T = 1`` linear, ``T = 0`` exp; spec 1.7).
        """
        for lin in (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed, self.o_proj):
            nn.init.normal_(lin.weight, std=self.config.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.conv1_weight is not None:
            self.conv1_weight.zero_()
            self.conv1_weight[:, -1] = 1.0
        if self.conv2_weight is not None:
            self.conv2_weight.zero_()
            dh = self.config.head_dim
            eye = torch.eye(dh, dtype=self.conv2_weight.dtype, device=self.conv2_weight.device)
            self.conv2_weight[..., -1] = eye.repeat(self.config.num_heads + self.config.num_kv_heads, 1)
        for b in (self.conv1_bias, self.conv2_bias):
            if b is not None:
                b.zero_()
        self.temperature.fill_(1.0 if self.config.temperature_mode == "linear" else 0.0)

    def _projections(self, x: torch.Tensor):
        return self._project(x, (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed))

    def _value_start(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """Delayed value before a sequence's first token: the projection of a zero hidden state (its bias)."""
        bias = self.v_proj_delayed.bias
        return None if bias is None else bias.to(like.dtype).expand(n, -1)

    def _op_kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            qk_mean=c.qk_mean,
            value_shift=c.value_shift,
            temperature_mode=c.temperature_mode,
            impl=self.impl,
        )

    def _conv_params(self):
        return self.conv1_weight, self.conv1_bias, self.conv2_weight, self.conv2_bias, self.temperature

    def _forward_packed(self, x, cu_seqlens, max_seqlen, positions, dense=None):
        c = self.config
        q0, k0, v_cur, v_del = self._projections(x)
        cos, sin = self._cos_sin(positions, c.rotary_dim, q0.dtype)
        v_start = self._value_start(cu_seqlens.numel() - 1, q0)
        q, k, v, _ = cca_prologue(q0, k0, v_cur, v_del, *self._conv_params(), cos, sin, cu_seqlens, max_seqlen,
                                  initial_value_state=v_start, **self._op_kwargs())  # fmt: skip
        o = self._attend(q, k, v, cu_seqlens, max_seqlen, c.head_dim**-0.5, dense)
        return self.o_proj(o.reshape(x.shape[0], c.q_width))

    def _forward_cached(self, x, plan: _CachePlan, state):
        c = self.config
        if not isinstance(state, CCACacheLayer) or state.key.shape[2:] != (c.num_kv_heads, c.head_dim):
            raise ValueError(f"cache entry does not fit a {c.kind} layer with {c.num_kv_heads}x{c.head_dim} kv heads")
        if state.conv_state.shape[1:] != (c.conv_channels, c.conv_padding):
            raise ValueError(f"conv_state {tuple(state.conv_state.shape)} does not fit C={c.conv_channels}, "
                             f"P={c.conv_padding}")  # fmt: skip
        q0, k0, v_cur, v_del = self._projections(x)
        cos, sin = self._cos_sin(plan.positions, c.rotary_dim, q0.dtype)
        fresh = state.seqlens == 0
        v_start = self._value_start(state.batch_size, q0)
        v_start = torch.zeros_like(state.value_state) if v_start is None else v_start
        if plan.decode:
            state.conv_state.masked_fill_(fresh[:, None, None], 0)
            state.value_state.copy_(torch.where(fresh[:, None], v_start, state.value_state))
            q, k, v = cca_decode_prologue(q0, k0, v_cur, v_del, state.conv_state, state.value_state,
                                          *self._conv_params(), cos, sin, **self._op_kwargs())  # fmt: skip
        else:
            conv_init = state.conv_state.masked_fill(fresh[:, None, None], 0)
            value_init = torch.where(fresh[:, None], v_start, state.value_state)
            q, k, v, (conv_state, value_state) = cca_prologue(
                q0, k0, v_cur, v_del, *self._conv_params(), cos, sin, plan.cu_seqlens, plan.width,
                initial_conv_state=conv_init, initial_value_state=value_init, return_final_state=True,
                **self._op_kwargs(),
            )  # fmt: skip
            state.conv_state.copy_(conv_state)
            state.value_state.copy_(value_state)
        state.write(plan.rows, plan.positions, k, v)
        o = self._cached_attention(q, state.key, state.value, plan, c.head_dim**-0.5)
        state.seqlens.copy_(plan.new_seqlens)
        return self.o_proj(o.reshape(x.shape[0], c.q_width))
