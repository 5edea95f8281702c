"""Eager references for the CCA / CCGQA prologue (``cca-spec.md`` sections 1-2): plain PyTorch, CPU, float64, autograd.

The prologue turns the projected latents into attention-ready ``q, k, v``:

    qk   = conv2(conv1(pad_P([q0 | k0])))          # causal; ONE shared left pad of P rows before both convs
    q, k = qk_q + mq, qk_k + mk                     # pre-conv qk-mean: mq = (q0 + k0[h // g]) / 2, mk = group mean
    q    = sqrt(d_h) q / |q|,  k = beta_j sqrt(d_h) k / |k|      # beta = T ("linear") or exp(T) ("exp")
    q, k = RoPE(q), RoPE(k)                         # NeoX rotate-half on the first rotary_dim dims
    v    = [v_cur(t) | v_del(t - 1)]                # value shift: last h_k/2 kv heads see the previous token

Every document of a packed batch is run on its own with ``F.conv1d`` over the padded window, exactly as the
specification's pseudo-code (section 1.10); the left pad is the document's initial conv state (zeros at a sequence
start). The decode reference runs this prefill reference on one token with the state as its left pad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trimformer.ops.rope.naive import naive_apply_rotary


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def naive_cca_prologue(
    q0: torch.Tensor,
    k0: torch.Tensor,
    v_cur: torch.Tensor,
    v_del: torch.Tensor,
    conv1_weight: torch.Tensor | None,
    conv1_bias: torch.Tensor | None,
    conv2_weight: torch.Tensor | None,
    conv2_bias: torch.Tensor | None,
    temperature: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    qk_mean: bool = True,
    value_shift: bool = True,
    temperature_mode: str = "linear",
    initial_conv_state: torch.Tensor | None = None,
    initial_value_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Reference :func:`trimformer.ops.cca.cca_prologue` (same arguments and shapes; see its docstring)."""
    hq, hk = num_heads, num_kv_heads
    dh = q0.shape[-1] // hq
    g = hq // hk
    cq, ck = q0.shape[-1], k0.shape[-1]
    c = cq + ck
    k1 = conv1_weight.shape[-1] if conv1_weight is not None else 1
    k2 = conv2_weight.shape[-1] if conv2_weight is not None else 1
    pad = (k1 - 1) + (k2 - 1)
    n_docs = cu_seqlens.numel() - 1
    bounds = cu_seqlens.tolist()
    qs, ks, vs, conv_states, value_states = [], [], [], [], []
    for n in range(n_docs):
        s, e = bounds[n], bounds[n + 1]
        length = e - s
        init = initial_conv_state[n] if initial_conv_state is not None else q0.new_zeros(c, pad)
        window = torch.cat([init, torch.cat([q0[s:e], k0[s:e]], dim=-1).t()], dim=1)  # [C, P + L]
        conv_states.append(window[:, window.shape[1] - pad :])
        prev = initial_value_state[n] if initial_value_state is not None else v_del.new_zeros(v_del.shape[-1])
        value_states.append(v_del[e - 1] if length > 0 else prev)
        if length == 0:
            continue
        y = window[None]
        if conv1_weight is not None:
            y = F.conv1d(y, conv1_weight[:, None, :], conv1_bias, groups=c)
        if conv2_weight is not None:
            y = F.conv1d(y, conv2_weight, conv2_bias, groups=hq + hk)
        y = y[0].t()  # [L, C]
        q = y[:, :cq].reshape(length, hq, dh)
        k = y[:, cq:].reshape(length, hk, dh)
        if qk_mean:
            mq = 0.5 * (q0[s:e].reshape(length, hq, dh) + k0[s:e].reshape(length, hk, dh).repeat_interleave(g, dim=1))
            q = q + mq
            k = k + mq.reshape(length, hk, g, dh).mean(dim=2)
        wide = _wide(q0.dtype)
        q, k = q.to(wide), k.to(wide)
        eps = torch.finfo(wide).eps
        beta = temperature.to(wide)
        beta = beta if temperature_mode == "linear" else beta.exp()
        q = math.sqrt(dh) * q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
        k = math.sqrt(dh) * beta[:, None] * k / k.norm(dim=-1, keepdim=True).clamp_min(eps)
        if cos is not None:
            q = naive_apply_rotary(q, cos[s:e], sin[s:e])
            k = naive_apply_rotary(k, cos[s:e], sin[s:e])
        qs.append(q.to(q0.dtype))
        ks.append(k.to(q0.dtype))
        delayed = torch.cat([prev[None], v_del[s : e - 1]]) if value_shift else v_del[s:e]
        vs.append(torch.cat([v_cur[s:e], delayed], dim=-1).reshape(length, hk, dh))
    empty_q, empty_kv = q0.new_zeros(0, hq, dh), q0.new_zeros(0, hk, dh)
    q = torch.cat(qs) if qs else empty_q
    k = torch.cat(ks) if ks else empty_kv
    v = torch.cat(vs) if vs else empty_kv
    final = None
    if return_final_state:
        conv = torch.stack(conv_states) if conv_states else q0.new_zeros(0, c, pad)
        value = torch.stack(value_states) if value_states else v_del.new_zeros(0, v_del.shape[-1])
        final = (conv, value)
    return q, k, v, final


def naive_cca_decode_prologue(
    q0: torch.Tensor,
    k0: torch.Tensor,
    v_cur: torch.Tensor,
    v_del: torch.Tensor,
    conv_state: torch.Tensor,
    value_state: torch.Tensor,
    conv1_weight: torch.Tensor | None,
    conv1_bias: torch.Tensor | None,
    conv2_weight: torch.Tensor | None,
    conv2_bias: torch.Tensor | None,
    temperature: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    *,
    num_heads: int,
    num_kv_heads: int,
    qk_mean: bool = True,
    value_shift: bool = True,
    temperature_mode: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference :func:`trimformer.ops.cca.cca_decode_prologue`: the prefill reference on one token per sequence,
    with the states as each sequence's left pad; the states are then overwritten in place."""
    batch = q0.shape[0]
    cu = torch.arange(batch + 1, dtype=torch.int32, device=q0.device)
    q, k, v, final = naive_cca_prologue(
        q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin, cu, 1,
        num_heads=num_heads, num_kv_heads=num_kv_heads, qk_mean=qk_mean, value_shift=value_shift,
        temperature_mode=temperature_mode, initial_conv_state=conv_state, initial_value_state=value_state,
        return_final_state=True,
    )  # fmt: skip
    conv_state.copy_(final[0])
    value_state.copy_(final[1])
    return q, k, v


def naive_cca_project_prologue(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight_current: torch.Tensor,
    v_weight_delayed: torch.Tensor,
    conv1_weight: torch.Tensor | None,
    conv1_bias: torch.Tensor | None,
    conv2_weight: torch.Tensor | None,
    conv2_bias: torch.Tensor | None,
    temperature: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    num_heads: int,
    num_kv_heads: int,
    q_bias: torch.Tensor | None = None,
    k_bias: torch.Tensor | None = None,
    v_bias_current: torch.Tensor | None = None,
    v_bias_delayed: torch.Tensor | None = None,
    qk_mean: bool = True,
    value_shift: bool = True,
    temperature_mode: str = "linear",
    initial_value_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference :func:`trimformer.ops.cca.cca_project_prologue`: the four projections (``F.linear`` in the dtype
    of ``x``), then :func:`naive_cca_prologue`."""
    q0 = F.linear(x, q_weight, q_bias)
    k0 = F.linear(x, k_weight, k_bias)
    v_cur = F.linear(x, v_weight_current, v_bias_current)
    v_del = F.linear(x, v_weight_delayed, v_bias_delayed)
    q, k, v, _ = naive_cca_prologue(
        q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin, cu_seqlens,
        max_seqlen, num_heads=num_heads, num_kv_heads=num_kv_heads, qk_mean=qk_mean, value_shift=value_shift,
        temperature_mode=temperature_mode, initial_value_state=initial_value_state,
    )  # fmt: skip
    return q, k, v
