"""Baseline attention layers with the same interface as :class:`~trimformer.layers.cca.CCAttention`: MHA, GQA, MLA.

All share the forward signature, the input handling, the cache and the RoPE of the CCA layer (NeoX rotate-half,
``config.rope_theta``), and their attention core goes through ``trimformer.ops.attention``:

* :class:`GroupedQueryAttention`: MHA (``kind="mha"``, ``num_kv_heads == num_heads``) and GQA (``kind="gqa"``, any
  group size): ``q, k, v = x W_Q, x W_K, x W_V``; RoPE on the first ``rotary_dim`` dims of q and k; causal attention
  with scale ``1/sqrt(d)``; ``y = o W_O``.
* :class:`MultiHeadLatentAttention`: DeepSeek-V2 MLA. The KV path is compressed jointly to a latent
  ``c = RMSNorm(x W_DKV)`` of width ``kv_lora_rank`` plus one decoupled RoPE key ``k_r = RoPE(x W_KR)`` shared by all
  heads; per-head keys and values are up-projected from ``c`` (``k = [c W_UK | k_r]``, ``v = c W_UV``). Queries come
  from ``x`` directly or through a low-rank latent (``q_lora_rank``): ``q = [q_nope | RoPE(q_rope)]``. The scale is
  ``1/sqrt(head_dim + rope_head_dim)``. The cache stores only ``[c | k_r]`` per token; decoding uses the absorbed
  form (``q_nope W_UK^T`` attends to ``c`` directly, the output is up-projected by ``W_UV`` afterwards).
"""

from __future__ import annotations

import torch
from torch import nn

from trimformer.layers.cache import KVCacheLayer, MLACacheLayer
from trimformer.layers.cca import AttentionBase, AttentionConfig, CCAttention, _CachePlan
from trimformer.ops.rope import apply_rotary


class GroupedQueryAttention(AttentionBase):
    """MHA / GQA. Parameters: ``q_proj [H d, E]``, ``k_proj``/``v_proj [H_kv d, E]``, ``o_proj [E, H d]``."""

    def __init__(self, config: AttentionConfig, *, impl: str = "auto", device=None, dtype=None) -> None:
        if config.kind not in ("mha", "gqa"):
            raise ValueError(f"GroupedQueryAttention needs kind 'mha' or 'gqa', got {config.kind!r}")
        super().__init__(config, impl)
        kw = {"device": device, "dtype": dtype, "bias": config.bias}
        e = config.hidden_size
        self.q_proj = nn.Linear(e, config.q_width, **kw)
        self.k_proj = nn.Linear(e, config.kv_width, **kw)
        self.v_proj = nn.Linear(e, config.kv_width, **kw)
        self.o_proj = nn.Linear(config.q_width, e, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Projections ~ N(0, ``init_std``), biases 0."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=self.config.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        c = self.config
        t = x.shape[0]
        q, k, v = self._project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(t, c.num_heads, c.head_dim)
        k, v = (y.reshape(t, c.num_kv_heads, c.head_dim) for y in (k, v))
        cos, sin = self._cos_sin(positions, c.rotary_dim, x.dtype)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def _forward_packed(self, x, cu_seqlens, max_seqlen, positions, dense=None):
        c = self.config
        q, k, v = self._qkv(x, positions)
        o = self._attend(q, k, v, cu_seqlens, max_seqlen, c.head_dim**-0.5, dense)
        return self.o_proj(o.reshape(x.shape[0], c.q_width))

    def _forward_cached(self, x, plan: _CachePlan, state):
        c = self.config
        if type(state) is not KVCacheLayer or state.key.shape[2:] != (c.num_kv_heads, c.head_dim):
            raise ValueError(f"cache entry does not fit a {c.kind} layer with {c.num_kv_heads}x{c.head_dim} kv heads")
        q, k, v = self._qkv(x, plan.positions)
        state.write(plan.rows, plan.positions, k, v)
        o = self._cached_attention(q, state.key, state.value, plan, c.head_dim**-0.5)
        state.seqlens.copy_(plan.new_seqlens)
        return self.o_proj(o.reshape(x.shape[0], c.q_width))


class MultiHeadLatentAttention(AttentionBase):
    """DeepSeek-V2 multi-head latent attention (see the module docstring).

    Parameters (``H`` heads, ``d = head_dim``, ``d_r = rope_head_dim``, ``r = kv_lora_rank``, ``r_q = q_lora_rank``):
    ``q_proj [H (d + d_r), E]`` when ``r_q == 0``, else ``q_a_proj [r_q, E]``, ``q_a_norm [r_q]``,
    ``q_b_proj [H (d + d_r), r_q]``; ``kv_a_proj [r + d_r, E]``, ``kv_a_norm [r]``, ``kv_b_proj [2 H d, r]``
    (per head: ``d`` key rows then ``d`` value rows); ``o_proj [E, H d]``. As in DeepSeek, ``config.bias`` puts
    biases on ``q_a_proj``, ``kv_a_proj`` and ``o_proj`` only.
    """

    norm_eps = 1e-6

    def __init__(self, config: AttentionConfig, *, impl: str = "auto", device=None, dtype=None) -> None:
        if config.kind != "mla":
            raise ValueError(f"MultiHeadLatentAttention needs kind 'mla', got {config.kind!r}")
        super().__init__(config, impl)
        kw = {"device": device, "dtype": dtype}
        e, h, d, dr, r, rq = (config.hidden_size, config.num_heads, config.head_dim, config.rope_head_dim,
                              config.kv_lora_rank, config.q_lora_rank)  # fmt: skip
        if rq:
            self.q_a_proj = nn.Linear(e, rq, bias=config.bias, **kw)
            self.q_a_norm = nn.RMSNorm(rq, eps=self.norm_eps, **kw)
            self.q_b_proj = nn.Linear(rq, h * (d + dr), bias=False, **kw)
        else:
            self.q_proj = nn.Linear(e, h * (d + dr), bias=False, **kw)
        self.kv_a_proj = nn.Linear(e, r + dr, bias=config.bias, **kw)
        self.kv_a_norm = nn.RMSNorm(r, eps=self.norm_eps, **kw)
        self.kv_b_proj = nn.Linear(r, 2 * h * d, bias=False, **kw)
        self.o_proj = nn.Linear(h * d, e, bias=config.bias, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Projections ~ N(0, ``init_std``), biases 0, RMSNorm weights 1."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=self.config.init_std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.RMSNorm):
                nn.init.ones_(mod.weight)

    def _queries(self, x, cos, sin):
        """``(q_nope [T, H, d], q_rope [T, H, d_r])`` with RoPE applied."""
        c = self.config
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if c.q_lora_rank else self.q_proj(x)
        q = q.reshape(x.shape[0], c.num_heads, c.head_dim + c.rope_head_dim)
        return q[..., : c.head_dim], apply_rotary(q[..., c.head_dim :], cos, sin)

    def _latent(self, x, cos, sin):
        """``(c [T, r], k_rope [T, d_r])``: normalised KV latent and the shared RoPE key."""
        c = self.config
        kv = self.kv_a_proj(x)
        latent = self.kv_a_norm(kv[:, : c.kv_lora_rank])
        k_rope = apply_rotary(kv[:, None, c.kv_lora_rank :], cos, sin)[:, 0]
        return latent, k_rope

    def _up_weights(self):
        """``(W_UK, W_UV)``, each ``[H, d, r]``."""
        c = self.config
        w = self.kv_b_proj.weight.reshape(c.num_heads, 2 * c.head_dim, c.kv_lora_rank)
        return w[:, : c.head_dim], w[:, c.head_dim :]

    @property
    def _scale(self) -> float:
        return (self.config.head_dim + self.config.rope_head_dim) ** -0.5

    def _forward_packed(self, x, cu_seqlens, max_seqlen, positions, dense=None):
        c = self.config
        t, h, d, dr = x.shape[0], c.num_heads, c.head_dim, c.rope_head_dim
        cos, sin = self._cos_sin(positions, dr, x.dtype)
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latent(x, cos, sin)
        kv = self.kv_b_proj(latent).reshape(t, h, 2 * d)
        k = torch.cat([kv[..., :d], k_rope[:, None].expand(t, h, dr)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        o = self._attend(q, k, kv[..., d:], cu_seqlens, max_seqlen, self._scale, dense)
        return self.o_proj(o.reshape(t, h * d))

    def _forward_cached(self, x, plan: _CachePlan, state):
        c = self.config
        if not isinstance(state, MLACacheLayer) or state.latent.shape[-1] != c.kv_lora_rank + c.rope_head_dim:
            raise ValueError(f"cache entry does not fit an mla layer with r={c.kv_lora_rank}, d_r={c.rope_head_dim}")
        t, r = x.shape[0], c.kv_lora_rank
        cos, sin = self._cos_sin(plan.positions, c.rope_head_dim, x.dtype)
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latent(x, cos, sin)
        state.write(plan.rows, plan.positions, torch.cat([latent, k_rope], dim=-1))
        w_uk, w_uv = self._up_weights()
        q = torch.cat([torch.einsum("thd,hdr->thr", q_nope, w_uk), q_rope], dim=-1)  # absorbed: [T, H, r + d_r]
        o = self._cached_attention(q, state.latent, state.latent, plan, self._scale)[..., :r]
        state.seqlens.copy_(plan.new_seqlens)
        o = torch.einsum("thr,hdr->thd", o, w_uv)
        return self.o_proj(o.reshape(t, c.num_heads * c.head_dim))


def build_attention(config: AttentionConfig, *, impl: str = "auto", device=None, dtype=None) -> AttentionBase:
    """The attention layer for ``config.kind`` (all share one forward signature)."""
    cls = {
        "mha": GroupedQueryAttention,
        "gqa": GroupedQueryAttention,
        "mla": MultiHeadLatentAttention,
        "cca": CCAttention,
        "ccgqa": CCAttention,
    }[config.kind]
    return cls(config, impl=impl, device=device, dtype=dtype)
