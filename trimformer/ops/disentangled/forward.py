"""Varlen disentangled-attention forward (Triton): DeBERTa's c2p/p2c terms added inside a flash-attention loop.

For query ``i`` and key ``j`` of one packed sequence (local positions), with ``row(i, j) = table[i - j + L - 1]``
(:mod:`trimformer.ops.disentangled.buckets`, the bucketed relative position shifted into the sliced range):

    s[i, j] = scale * (q_i . k_j + C2P[i, row(i, j)] + P2C[j, row(i, j)])

``C2P = q Kr^T`` ``[T, H, R]`` and ``P2C = k Qr^T`` ``[T, H, R]`` are precomputed by one batched GEMM each over the
``R`` position rows any pair can reach, so the ``[S, S]`` bias never exists: every ``[BLOCK_M, BLOCK_N]`` tile
gathers its c2p values from the query rows' ``C2P`` and its p2c values from the key rows' ``P2C`` (both hot in L1/L2:
a tile touches ``BLOCK_M + BLOCK_N`` rows of ``R`` entries), then runs the usual online softmax (base 2, fp32
accumulators). One program per ``(query tile, head, sequence)``; tiles past a sequence's end exit at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.triton_utils import (
    cdiv,
    dot_precision,
    dtype_reason,
    interpreting,
    next_power_of_2,
    num_sms,
    padded_head_dim,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class DisentangledConfig:
    """Launch configuration: query tile, key block, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=128)
def default_config(head_dim: int, max_seqlen: int, *, programs: int = 0, sms: int = 0) -> DisentangledConfig:
    """Hand-picked blocks (64 x 64 for head dims up to 64, else 64 x 32); small blocks under the interpreter.

    ``programs`` is ``sequences x heads``; the query tile halves (down to 16) while the grid would leave SMs idle.
    """
    bd = padded_head_dim(head_dim)
    if interpreting():
        b = min(64, max(16, next_power_of_2(max_seqlen)))
        return DisentangledConfig(b, b, 4, 1)
    cfg = DisentangledConfig(64, 64, 4, 2) if bd <= 64 else DisentangledConfig(64, 32, 4, 2)
    block_m = cfg.block_m
    while block_m > 16 and programs * cdiv(max_seqlen, block_m) < sms:
        block_m //= 2
    return DisentangledConfig(block_m, cfg.block_n, cfg.num_warps, cfg.num_stages)


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the kernel cannot take ``q`` (``[T, H, D]``), or ``None`` when it can."""
    reason = dtype_reason(q)
    if reason is not None:
        return reason
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (supported: 1..{MAX_HEAD_DIM})"
    if q.shape[-2] > _MAX_GRID_YZ:
        return f"{q.shape[-2]} heads (at most {_MAX_GRID_YZ})"
    return None


@triton.jit
def _block(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, c2p_rows, p2c_base, table_base, start_n,
    offs_m, offs_n, m_ok, d_ok, seqlen, stride_kt, stride_vt, stride_pt, qk_scale,
    C2P_ON: tl.constexpr, P2C_ON: tl.constexpr, MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """One key block ``[start_n, start_n + BLOCK_N)`` of the online softmax."""
    cols = start_n + offs_n
    col_ok = cols < seqlen
    if MASK_KEYS:
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BM, BN] fp32
    if C2P_ON or P2C_ON:
        pair_ok = m_ok[:, None] & col_ok[None, :]
        rows = tl.load(table_base + (offs_m[:, None] - cols[None, :]), mask=pair_ok, other=0)  # [BM, BN] int32
        if C2P_ON:
            s += tl.load(c2p_rows[:, None] + rows, mask=pair_ok, other=0.0).to(tl.float32)
        if P2C_ON:
            p2c_cols = p2c_base + cols.to(tl.int64) * stride_pt
            s += tl.load(p2c_cols[None, :] + rows, mask=pair_ok, other=0.0).to(tl.float32)
    if MASK_KEYS:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _disentangled_fwd_kernel(
    Q, K, V, O, C2P, P2C, TABLE, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ct, stride_ch, stride_pt, stride_ph,
    table_center, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    C2P_ON: tl.constexpr, P2C_ON: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.program_id(2)
    bos = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - bos
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen
    q_rows = (bos + offs_m).to(tl.int64)
    q = tl.load(
        Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
    )
    kv_rows = (bos + offs_n).to(tl.int64)
    k_ptrs = K + kv_rows[:, None] * stride_kt + h * stride_kh + offs_d[None, :]
    v_ptrs = V + kv_rows[:, None] * stride_vt + h * stride_vh + offs_d[None, :]
    c2p_rows = C2P + q_rows * stride_ct + h * stride_ch  # [BM] pointers to each query's C2P row
    p2c_base = P2C + bos.to(tl.int64) * stride_pt + h * stride_ph
    table_base = TABLE + table_center
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full = (seqlen // BLOCK_N) * BLOCK_N  # key blocks below it need no key mask
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, c2p_rows, p2c_base, table_base, start_n,
            offs_m, offs_n, m_ok, d_ok, seqlen, stride_kt, stride_vt, stride_pt, qk_scale,
            C2P_ON, P2C_ON, False, EVEN_D, DOT_PREC,
        )  # fmt: skip
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    if full < seqlen:
        acc, l_i, m_i = _block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, c2p_rows, p2c_base, table_base, full,
            offs_m, offs_n, m_ok, d_ok, seqlen, stride_kt, stride_vt, stride_pt, qk_scale,
            C2P_ON, P2C_ON, True, EVEN_D, DOT_PREC,
        )  # fmt: skip
    acc = acc / l_i[:, None]
    tl.store(
        O + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def disentangled_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    c2p_scores: torch.Tensor | None,
    p2c_scores: torch.Tensor | None,
    table: torch.Tensor,
    table_length: int,
    *,
    scale: float,
    config: DisentangledConfig | None = None,
) -> torch.Tensor:
    """Launch the kernel. Inputs are assumed validated by ``api.py``.

    Args:
        q, k, v: ``[T, H, D]`` (fp16, bf16 or fp32; unit stride on ``D``).
        cu_seqlens: ``[N + 1]`` int32 on q's device; max_seqlen: host int.
        c2p_scores: ``[T, H, R]`` ``q Kr^T`` over the sliced position rows (unit stride on ``R``), or ``None``.
        p2c_scores: ``[T, H, R]`` ``k Qr^T``, or ``None``.
        table: ``[2 L - 1]`` int32 row index per relative distance (``L = table_length >= max_seqlen``).
        scale: logit scale applied to the sum of the three terms.
        config: launch override (benchmarks, tests).

    Returns:
        ``[T, H, D]`` contiguous, dtype of ``q``.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    total, heads, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    n_seq = cu_seqlens.numel() - 1
    if total == 0 or n_seq == 0 or max_seqlen <= 0:
        return out
    cfg = config or default_config(d, max_seqlen, programs=n_seq * heads, sms=num_sms(q.device))
    c2p_t = c2p_scores if c2p_scores is not None else q  # placeholder pointer when the term is off
    p2c_t = p2c_scores if p2c_scores is not None else q
    n_m = cdiv(max_seqlen, cfg.block_m)
    for s0 in range(0, n_seq, _MAX_GRID_YZ):
        n = min(_MAX_GRID_YZ, n_seq - s0)
        _disentangled_fwd_kernel[(n_m, heads, n)](
            q, k, v, out, c2p_t, p2c_t, table, cu_seqlens if s0 == 0 else cu_seqlens[s0:],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            c2p_t.stride(0), c2p_t.stride(1), p2c_t.stride(0), p2c_t.stride(1),
            table_length - 1, scale * LOG2E,
            HEAD_DIM=d, BLOCK_D=padded_head_dim(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            C2P_ON=c2p_scores is not None, P2C_ON=p2c_scores is not None, DOT_PREC=dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return out


__all__ = ["DisentangledConfig", "default_config", "disentangled_attention_fwd", "unsupported_reason"]
