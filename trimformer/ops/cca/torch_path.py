"""The CCA prologue in vectorised PyTorch: the path used until fused kernels take over, and the CPU training path.

Instead of padding each document and running ``F.conv1d`` (the reference), every token gathers its own causal
window of ``P + 1`` pre-conv rows ``[q0 | k0]`` (rows before its document's start come from the initial conv state,
or are zero). Both convolutions are then small contractions over that window, so documents never mix and no Python
loop over documents is needed. All index math stays on the device (no host sync), given ``T`` and ``N`` from shapes.
"""

from __future__ import annotations

import math

import torch

from trimformer.ops.rope.api import apply_rotary


def token_rows(cu_seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document index and in-document offset of every packed token.

    Args:
        cu_seqlens: ``[N + 1]`` int32 cumulative lengths.
        num_tokens: ``T`` (host int, from a shape).

    Returns:
        ``(rows, offsets)``: both ``[T]`` int64.
    """
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    rows = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu.device), lengths, output_size=num_tokens
    )  # no host sync
    offsets = torch.arange(num_tokens, device=cu.device) - cu[rows]
    return rows, offsets


def _gather_rows(
    rows_src: torch.Tensor, pos_in_doc: torch.Tensor, packed: torch.Tensor, state: torch.Tensor | None, docs
) -> torch.Tensor:
    """``out[..., :] = packed[rows_src]`` where ``pos_in_doc >= 0``, else ``state[docs, :, P + pos_in_doc]`` (or 0).

    ``rows_src``/``pos_in_doc``/``docs``: ``[M, W]`` int64; ``packed``: ``[T, C]``; ``state``: ``[N, C, P]``.
    Returns ``[M, W, C]``.
    """
    inside = pos_in_doc >= 0
    if packed.shape[0] > 0:
        taken = packed[rows_src.clamp(0, packed.shape[0] - 1)]
    else:
        taken = packed.new_zeros(*rows_src.shape, packed.shape[-1])
    pad = state.shape[-1] if state is not None else 0
    if state is None or pad == 0:
        return torch.where(inside[..., None], taken, taken.new_zeros(()))
    idx = (pad + pos_in_doc).clamp(0, pad - 1)  # [M, W]
    hist = state.transpose(1, 2)[docs, idx]  # [M, W, C]
    return torch.where(inside[..., None], taken, hist)


def _convolve(window: torch.Tensor, w1, b1, w2, b2, groups: int) -> torch.Tensor:
    """Both valid convolutions over per-token windows ``[M, P + 1, C]`` -> ``[M, C]``."""
    if w1 is None:
        return window[:, -1]
    k1 = w1.shape[-1]
    y = (window.unfold(1, k1, 1) * w1).sum(-1)  # [M, k2, C]
    if b1 is not None:
        y = y + b1
    if w2 is None:
        return y[:, -1]
    m, k2, c = y.shape
    dh = c // groups
    y = torch.einsum("migc,goci->mgo", y.reshape(m, k2, groups, dh), w2.reshape(groups, dh, dh, k2))
    y = y.reshape(m, c)
    return y + b2 if b2 is not None else y


def _finish_qk(q_conv, k_conv, q0, k0, temperature, cos, sin, hq, hk, qk_mean, temperature_mode):
    """qk-mean, L2 QK-norm times sqrt(d_h), key temperature, RoPE: ``[M, Cq], [M, Ck] -> [M, hq, dh], [M, hk, dh]``."""
    m = q0.shape[0]
    dh = q0.shape[-1] // hq
    q = q_conv.reshape(m, hq, dh)
    k = k_conv.reshape(m, hk, dh)
    if qk_mean:
        mq = 0.5 * (q0.reshape(m, hq, dh) + k0.reshape(m, hk, 1, dh).expand(m, hk, hq // hk, dh).reshape(m, hq, dh))
        q = q + mq
        k = k + mq.reshape(m, hk, hq // hk, dh).mean(dim=2)
    wide = torch.float64 if q0.dtype == torch.float64 else torch.float32
    q, k = q.to(wide), k.to(wide)
    eps = torch.finfo(wide).eps
    beta = temperature.to(wide)
    if temperature_mode == "exp":
        beta = beta.exp()
    scale = math.sqrt(dh)
    q = q * (scale / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(eps))
    k = k * ((scale * beta)[:, None] / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(eps))
    if cos is not None:
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
    return q.to(q0.dtype), k.to(q0.dtype)


def torch_cca_prologue(
    q0, k0, v_cur, v_del, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature, cos, sin, cu_seqlens,
    max_seqlen, *, num_heads, num_kv_heads, qk_mean, value_shift, temperature_mode, initial_conv_state,
    initial_value_state, return_final_state,
):  # fmt: skip
    """Vectorised :func:`trimformer.ops.cca.cca_prologue` (arguments validated there)."""
    hq, hk = num_heads, num_kv_heads
    t = q0.shape[0]
    n_docs = cu_seqlens.numel() - 1
    dh = q0.shape[-1] // hq
    k1 = conv1_weight.shape[-1] if conv1_weight is not None else 1
    k2 = conv2_weight.shape[-1] if conv2_weight is not None else 1
    pad = (k1 - 1) + (k2 - 1)
    rows, offsets = token_rows(cu_seqlens, t)
    qk0 = torch.cat([q0, k0], dim=-1)  # [T, C]
    if conv1_weight is not None:
        j = torch.arange(-pad, 1, device=q0.device)
        pos = offsets[:, None] + j  # [T, P + 1]
        glob = torch.arange(t, device=q0.device)[:, None] + j
        window = _gather_rows(glob, pos, qk0, initial_conv_state, rows[:, None].expand_as(pos))
        conv = _convolve(window, conv1_weight, conv1_bias, conv2_weight, conv2_bias, hq + hk)
    else:
        conv = qk0
    q, k = _finish_qk(conv[:, : q0.shape[-1]], conv[:, q0.shape[-1] :], q0, k0, temperature, cos, sin, hq, hk,
                      qk_mean, temperature_mode)  # fmt: skip
    first = offsets == 0
    if value_shift:
        prev = v_del[(torch.arange(t, device=q0.device) - 1).clamp_min(0)]
        start = initial_value_state[rows] if initial_value_state is not None else prev.new_zeros(())
        delayed = torch.where(first[:, None], start, prev)
    else:
        delayed = v_del
    v = torch.cat([v_cur, delayed], dim=-1).reshape(t, hk, dh)
    final = None
    if return_final_state:
        cu = cu_seqlens.to(torch.long)
        lengths = cu[1:] - cu[:-1]
        jj = torch.arange(-pad, 0, device=q0.device)
        pos = lengths[:, None] + jj  # [N, P]
        docs = torch.arange(n_docs, device=q0.device)[:, None].expand_as(pos)
        conv_state = _gather_rows(cu[:-1, None] + pos, pos, qk0, initial_conv_state, docs).transpose(1, 2)
        last = v_del[(cu[1:] - 1).clamp(0, max(t - 1, 0))] if t > 0 else v_del.new_zeros(n_docs, v_del.shape[-1])
        before = initial_value_state if initial_value_state is not None else last.new_zeros(())
        value_state = torch.where((lengths > 0)[:, None], last, before)
        final = (conv_state.contiguous(), value_state)
    return q, k, v, final


def torch_cca_decode_prologue(
    q0, k0, v_cur, v_del, conv_state, value_state, conv1_weight, conv1_bias, conv2_weight, conv2_bias, temperature,
    cos, sin, *, num_heads, num_kv_heads, qk_mean, value_shift, temperature_mode,
):  # fmt: skip
    """Vectorised :func:`trimformer.ops.cca.cca_decode_prologue`: static shapes, no host sync, in-place states."""
    hq, hk = num_heads, num_kv_heads
    b = q0.shape[0]
    dh = q0.shape[-1] // hq
    qk0 = torch.cat([q0, k0], dim=-1)
    window = torch.cat([conv_state.transpose(1, 2).to(qk0.dtype), qk0[:, None]], dim=1)  # [B, P + 1, C]
    if conv1_weight is not None:
        conv = _convolve(window, conv1_weight, conv1_bias, conv2_weight, conv2_bias, hq + hk)
    else:
        conv = qk0
    q, k = _finish_qk(conv[:, : q0.shape[-1]], conv[:, q0.shape[-1] :], q0, k0, temperature, cos, sin, hq, hk,
                      qk_mean, temperature_mode)  # fmt: skip
    delayed = value_state.to(v_del.dtype) if value_shift else v_del
    v = torch.cat([v_cur, delayed], dim=-1).reshape(b, hk, dh)  # a copy: value_state may now be overwritten
    conv_state.copy_(window[:, 1:].transpose(1, 2))
    value_state.copy_(v_del)
    return q, k, v
