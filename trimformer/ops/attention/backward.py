"""Varlen flash-attention backward (Triton) and the autograd ``Function`` tying it to the forward.

Math (FlashAttention-2 backward): with ``P = softmax(scale * Q K^T)`` recomputed from the forward's logsumexp,
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O)``, ``dQ = scale * dS K``,
``dK = scale * dS^T Q``. Three launches:

1. ``delta`` per (query head, token);
2. ``dK, dV``: one program per (key block, kv head, sequence) streams the query blocks of *every* query head of its
   GQA group, so the group's contributions are summed in registers: no atomics, deterministic;
3. ``dQ``: one program per (query block, query head, sequence) streams the key blocks.

Out-of-sequence rows are loaded as zeros (their ``lse`` as ``+inf``), which makes their contributions exactly zero
without a mask; the causal mask is applied only on the diagonal band of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.attention.forward import LOG2E, varlen_attention_fwd
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting, next_power_of_2, padded_head_dim

_MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class BwdConfig:
    """Block sizes of the dK/dV kernel (``block_m1`` queries x ``block_n1`` keys) and of the dQ kernel."""

    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int
    num_warps_dq: int | None = None  # the dQ kernel's warps when they differ from the dK/dV kernel's


def default_bwd_config(head_dim: int, max_seqlen: int) -> BwdConfig:
    """Hand-picked configuration (see NOTES.md); small blocks under the interpreter."""
    bd = padded_head_dim(head_dim)
    if interpreting():
        b = min(32, max(16, next_power_of_2(max_seqlen)))
        return BwdConfig(b, b, b, b, 4, 1)
    if bd <= 64:
        return BwdConfig(64, 64, 64, 64, 4, 3)
    if bd <= 128:
        return BwdConfig(32, 64, 64, 32, 4, 3)
    return BwdConfig(32, 32, 64, 32, 4, 2)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dt, stride_dh, total, HEAD_DIM: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_t.to(tl.int64)[:, None]
    o = tl.load(O + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows * stride_dt + h * stride_dh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * total + offs_t, tl.sum(o * do, 1), mask=offs_t < total)


@triton.jit
def _load_rows(ptrs, offs, limit, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    if MASK_ROWS:
        return tl.load(ptrs, mask=(offs < limit)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qt, stride_dt, lo, hi, offs_m, offs_n,
               d_ok, seqlen, qk_scale, BLOCK_M: tl.constexpr, MASK_ROWS: tl.constexpr, CAUSAL_MASK: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Accumulate dK, dV of one key block over query blocks ``[lo, hi)``; pointers point at query row ``lo``."""
    offs_m = lo + offs_m
    for _ in range(lo, hi, BLOCK_M):
        q = _load_rows(q_ptrs, offs_m, seqlen, d_ok, MASK_ROWS, EVEN_D)  # [BM, BD]
        do = _load_rows(do_ptrs, offs_m, seqlen, d_ok, MASK_ROWS, EVEN_D)
        if MASK_ROWS:
            m_ok = offs_m < seqlen
            lse2 = tl.load(lse_ptrs, mask=m_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_ptrs, mask=m_ok, other=0.0)
        else:
            lse2 = tl.load(lse_ptrs) * 1.4426950408889634
            delta = tl.load(delta_ptrs)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale - lse2[None, :])  # [BN, BM]
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
        offs_m += BLOCK_M
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dt
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                     stride_vh, stride_dt, stride_dh, stride_dkt, stride_dkh, stride_lh, qk_scale, scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    kh = tl.program_id(1)
    seq = tl.program_id(2)
    bos = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - bos
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seqlen:
        return
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = (offs_n < seqlen)[:, None] & d_ok[None, :]
    krows = (bos + offs_n).to(tl.int64)[:, None]
    k = tl.load(K + krows * stride_kt + kh * stride_kh + offs_d[None, :], mask=n_ok, other=0.0)  # [BN, BD]
    v = tl.load(V + krows * stride_vt + kh * stride_vh + offs_d[None, :], mask=n_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        band_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, seqlen)
    else:
        lo = tl.full([], 0, dtype=tl.int32)
        band_hi = tl.full([], 0, dtype=tl.int32)
    full_hi = tl.maximum(band_hi, (seqlen // BLOCK_M) * BLOCK_M)
    qrows = (bos + offs_m).to(tl.int64)[:, None]
    for g in range(GROUP):
        hq = kh * GROUP + g
        q_ptrs = Q + qrows * stride_qt + hq * stride_qh + offs_d[None, :]
        do_ptrs = DO + qrows * stride_dt + hq * stride_dh + offs_d[None, :]
        lse_ptrs = LSE + hq.to(tl.int64) * stride_lh + bos + offs_m
        delta_ptrs = DELTA + hq.to(tl.int64) * stride_lh + bos + offs_m
        if CAUSAL:
            lo64 = lo.to(tl.int64)
            dk, dv = _dkdv_loop(
                dk, dv, k, v, q_ptrs + lo64 * stride_qt, do_ptrs + lo64 * stride_dt, lse_ptrs + lo64,
                delta_ptrs + lo64,
                stride_qt, stride_dt, lo, band_hi, offs_m, offs_n, d_ok, seqlen, qk_scale, BLOCK_M, True, True,
                EVEN_D, DOT_PREC,
            )  # fmt: skip
        mid = band_hi.to(tl.int64)
        dk, dv = _dkdv_loop(
            dk, dv, k, v, q_ptrs + mid * stride_qt, do_ptrs + mid * stride_dt, lse_ptrs + mid, delta_ptrs + mid,
            stride_qt, stride_dt, band_hi, full_hi, offs_m, offs_n, d_ok, seqlen, qk_scale, BLOCK_M, False, False,
            EVEN_D, DOT_PREC,
        )  # fmt: skip
        tail = full_hi.to(tl.int64)
        dk, dv = _dkdv_loop(
            dk, dv, k, v, q_ptrs + tail * stride_qt, do_ptrs + tail * stride_dt, lse_ptrs + tail, delta_ptrs + tail,
            stride_qt, stride_dt, full_hi, seqlen, offs_m, offs_n, d_ok, seqlen, qk_scale, BLOCK_M, True, False,
            EVEN_D, DOT_PREC,
        )  # fmt: skip
    out_rows = (bos + offs_n).to(tl.int64)[:, None] * stride_dkt + kh * stride_dkh + offs_d[None, :]
    tl.store(DK + out_rows, (dk * scale).to(DK.dtype.element_ty), mask=n_ok)
    tl.store(DV + out_rows, dv.to(DV.dtype.element_ty), mask=n_ok)


@triton.jit
def _dq_loop(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, lo, hi, offs_m, offs_n, d_ok, seqlen,
             qk_scale, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr,
             EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Accumulate dQ of one query block over key blocks ``[lo, hi)``; pointers point at key row ``lo``."""
    cols = lo + offs_n
    for _ in range(lo, hi, BLOCK_N):
        k = _load_rows(k_ptrs, cols, seqlen, d_ok, MASK_KEYS, EVEN_D)  # [BN, BD]
        v = _load_rows(v_ptrs, cols, seqlen, d_ok, MASK_KEYS, EVEN_D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale - lse2[:, None])  # [BM, BN]
        if CAUSAL_MASK:
            p = tl.where(cols[None, :] <= offs_m[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        cols += BLOCK_N
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dt, stride_dh, stride_dqt, stride_dqh, stride_lh, qk_scale, scale, n_m_blocks,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = n_m_blocks - 1 - pid_m
    hq = tl.program_id(1)
    seq = tl.program_id(2)
    bos = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - bos
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    kh = hq // GROUP
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    mask = m_ok[:, None] & d_ok[None, :]
    rows = (bos + offs_m).to(tl.int64)[:, None]
    q = tl.load(Q + rows * stride_qt + hq * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows * stride_dt + hq * stride_dh + offs_d[None, :], mask=mask, other=0.0)
    lse2 = tl.load(LSE + hq.to(tl.int64) * stride_lh + bos + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + hq.to(tl.int64) * stride_lh + bos + offs_m, mask=m_ok, other=0.0)
    kv_rows = (bos + offs_n).to(tl.int64)[:, None]
    k_ptrs = K + kv_rows * stride_kt + kh * stride_kh + offs_d[None, :]
    v_ptrs = V + kv_rows * stride_vt + kh * stride_vh + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        mid = ((start_m + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        mid = (seqlen // BLOCK_N) * BLOCK_N
        hi = seqlen
    dq = _dq_loop(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, mid, offs_m, offs_n, d_ok, seqlen,
                  qk_scale, BLOCK_N, False, False, EVEN_D, DOT_PREC)  # fmt: skip
    m64 = mid.to(tl.int64)
    dq = _dq_loop(dq, q, do, lse2, delta, k_ptrs + m64 * stride_kt, v_ptrs + m64 * stride_vt, stride_kt, stride_vt,
                  mid, hi, offs_m, offs_n, d_ok, seqlen, qk_scale, BLOCK_N, True, CAUSAL, EVEN_D, DOT_PREC)  # fmt: skip
    dq_ptrs = DQ + rows * stride_dqt + hq * stride_dqh + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


def varlen_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float,
    config: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`varlen_attention_fwd` with respect to q, k and v.

    Args:
        dout, out: ``[T, Hq, D]``; q: ``[T, Hq, D]``; k, v: ``[T, Hk, D]`` (unit stride on ``D``).
        lse: ``[Hq, T]`` fp32 natural-log logsumexp from the forward (``return_lse=True``).
        cu_seqlens: ``[N + 1]`` int32; max_seqlen: host int; causal, scale: as in the forward.
        config: block-size override (benchmarks); default :func:`default_bwd_config`.

    Returns:
        ``(dq [T, Hq, D], dk [T, Hk, D], dv [T, Hk, D])`` in the dtypes of q, k, v.
    """
    total, hq, d = q.shape
    hk = k.shape[1]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq = torch.empty((total, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((total, hk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((total, hk, d), dtype=v.dtype, device=v.device)
    n_seq = cu_seqlens.numel() - 1
    if total == 0 or n_seq == 0 or max_seqlen <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = config or default_bwd_config(d, max_seqlen)
    bd = padded_head_dim(d)
    delta = torch.empty((hq, total), dtype=torch.float32, device=q.device)
    block_t = 64 if interpreting() else max(16, 8192 // bd)
    _bwd_delta_kernel[(cdiv(total, block_t), hq)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), total,
        HEAD_DIM=d, BLOCK_T=block_t, BLOCK_D=bd,
    )  # fmt: skip
    lse = lse.contiguous()
    qk_scale = scale * LOG2E
    common = dict(GROUP=hq // hk, HEAD_DIM=d, BLOCK_D=bd, CAUSAL=bool(causal), DOT_PREC=dot_precision(q.dtype))
    n_m = cdiv(max_seqlen, cfg.block_m2)
    for s0 in range(0, n_seq, _MAX_GRID_YZ):
        n = min(_MAX_GRID_YZ, n_seq - s0)
        cu = cu_seqlens if s0 == 0 else cu_seqlens[s0:]
        _bwd_dkdv_kernel[(cdiv(max_seqlen, cfg.block_n1), hk, n)](
            q, k, v, dout, lse, delta, dk, dv, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), lse.stride(0),
            qk_scale, scale, BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **common,
        )  # fmt: skip
        _bwd_dq_kernel[(n_m, hq, n)](
            q, k, v, dout, lse, delta, dq, cu, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            qk_scale, scale, n_m, BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2,
            num_warps=cfg.num_warps_dq or cfg.num_warps, num_stages=cfg.num_stages, **common,
        )  # fmt: skip
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves q, k, v, out and the logsumexp; backward runs the three kernels above."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale):
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        v = v if v.stride(-1) == 1 else v.contiguous()
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale, return_lse=True)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = varlen_attention_bwd(
            dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, causal=ctx.causal, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None, None


def varlen_attention_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Differentiable varlen attention through the Triton kernels (shapes as in ``varlen_attention_fwd``)."""
    return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale)


__all__ = ["BwdConfig", "VarlenAttentionFunction", "default_bwd_config", "varlen_attention_autograd",
           "varlen_attention_bwd"]  # fmt: skip
