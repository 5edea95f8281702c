"""Flash-decoding over a preallocated key/value cache (Triton): split over the cache length, then combine.

Math: each program takes one (split of the cache, kv head, batch row) and runs an online softmax over its keys for
all ``Tq x G`` query rows that read this kv head (the ``G = Hq / Hk`` query heads of the GQA group times the ``Tq``
new tokens), so a key block is loaded once for the whole group. It writes a normalised partial output and its
base-2 logsumexp; a second kernel merges the splits with the usual ``exp2(lse_s - max)`` weights. With one split
the first kernel writes the output directly.

Query ``i`` of row ``b`` sits at position ``cache_seqlens[b] - Tq + i`` (bottom-right causal alignment) and sees
cache rows ``0 ..`` that position. The number of splits depends only on shapes (``B``, ``Hk``, ``S_max``, SM count):
no host reads, static launches, so the call can be captured in a CUDA graph. Splits beyond a row's length exit at
once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trimformer.ops.attention.forward import LOG2E
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting, next_power_of_2, num_sms, padded_head_dim


@triton.jit
def _decode_split_kernel(Q, K, V, SEQLENS, O, OPART, LPART, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt,
                         stride_kh, stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, qk_scale,
                         chunk, n_splits, n_row_blocks, HQ, TQ: tl.constexpr, GROUP: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    pid_s = pid // n_row_blocks
    rb = pid % n_row_blocks
    kh = tl.program_id(1)
    b = tl.program_id(2)
    seqlen = tl.load(SEQLENS + b).to(tl.int32)
    start = pid_s * chunk
    if (start >= seqlen) & (pid_s > 0):  # split 0 always runs, so an empty row still gets its (zero) output
        return
    end = tl.minimum(start + chunk, seqlen)
    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # query row = (token t, head of the group hh)
    r_ok = r < TQ * GROUP
    t = r // GROUP
    hq = kh * GROUP + r % GROUP
    pos = seqlen - TQ + t
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + (t * stride_qt + hq * stride_qh)[:, None] + offs_d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BM, BD]
    rows = (start + offs_n).to(tl.int64)[:, None]
    k_ptrs = K + b64 * stride_kb + rows * stride_kt + kh * stride_kh + offs_d[None, :]  # [BN, BD]
    v_ptrs = V + b64 * stride_vb + rows * stride_vt + kh * stride_vh + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kmask = cols < end
        k = tl.load(k_ptrs, mask=kmask[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=kmask[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BM, BN]
        s = tl.where((cols[None, :] <= pos[:, None]) & kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet stay at zero
        p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:
        part = ((b64 * HQ + hq) * TQ + t) * n_splits + pid_s  # [BM] row of OPART / LPART
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=r_ok[:, None] & d_ok[None, :])
        tl.store(LPART + part, tl.where(has, m_i + tl.log2(l_i), float("-inf")), mask=r_ok)
    else:
        tl.store(
            O + b64 * stride_ob + (t * stride_ot + hq * stride_oh)[:, None] + offs_d[None, :],
            o.to(O.dtype.element_ty),
            mask=r_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _decode_combine_kernel(OPART, LPART, SEQLENS, O, stride_ob, stride_ot, stride_oh, chunk, n_splits, HQ,
                           TQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_S: tl.constexpr):  # fmt: skip
    th = tl.program_id(0)  # t * HQ + hq
    b = tl.program_id(1)
    t = th // HQ
    hq = th % HQ
    seqlen = tl.load(SEQLENS + b).to(tl.int32)
    n_valid = tl.minimum(tl.cdiv(seqlen, chunk), n_splits)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_valid
    part = ((b.to(tl.int64) * HQ + hq) * TQ + t) * n_splits + offs_s
    lse = tl.load(LPART + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    o = tl.load(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :],
                other=0.0)  # fmt: skip
    den = tl.sum(w, 0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(
        O + b.to(tl.int64) * stride_ob + t * stride_ot + hq * stride_oh + offs_d,
        res.to(O.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def decode_num_splits(batch: int, kv_heads: int, s_max: int, block_n: int, sms: int) -> tuple[int, int]:
    """``(n_splits, chunk)``: enough programs to fill ~2 waves of ``sms``, each split at least 4 key blocks."""
    n_blocks = cdiv(max(s_max, 1), block_n)
    want = max(1, min(cdiv(2 * sms, max(batch * kv_heads, 1)), cdiv(n_blocks, 4)))
    chunk = cdiv(n_blocks, want) * block_n
    return cdiv(max(s_max, 1), chunk), chunk


def kvcache_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``Tq`` new queries over a key/value cache. Inputs are assumed validated by ``api.py``.

    Args:
        q: ``[B, Tq, Hq, D]`` (fp16, bf16 or fp32; unit stride on ``D``, any other strides).
        k_cache, v_cache: ``[B, S_max, Hk, D]`` with ``Hq % Hk == 0``; the new tokens already written.
        cache_seqlens: ``[B]`` int32 (or int64) on the device: valid rows per sequence including the ``Tq`` new ones.
        scale: logit scale.
        num_splits: split count override (benchmarks, tests); default from :func:`decode_num_splits`.

    Returns:
        ``[B, Tq, Hq, D]`` contiguous, dtype of q. Rows whose position is negative (``cache_seqlens < Tq``) are zero.
    """
    if q.shape[0] > 65535 or k_cache.shape[2] > 65535:
        raise ValueError(f"kvcache_attention_fwd supports at most 65535 batch rows and kv heads, got {tuple(q.shape)}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    bsz, tq, hq, d = q.shape
    s_max, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    out = torch.empty((bsz, tq, hq, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if s_max == 0:
        return out.zero_()
    bd = padded_head_dim(d)
    block_n = 32 if interpreting() or bd > 128 else 64
    block_m = min(128, max(16, next_power_of_2(tq * group)))
    n_rb = cdiv(tq * group, block_m)
    if num_splits is None:
        n_splits, chunk = decode_num_splits(bsz, hk, s_max, block_n, num_sms(q.device))
    else:
        chunk = cdiv(cdiv(s_max, max(1, num_splits)), block_n) * block_n
        n_splits = cdiv(s_max, chunk)
    split = n_splits > 1
    opart = torch.empty((bsz, hq, tq, n_splits, d), dtype=torch.float32, device=q.device) if split else out
    lpart = torch.empty((bsz, hq, tq, n_splits), dtype=torch.float32, device=q.device) if split else out
    num_warps = 4 if bd <= 64 else 8
    _decode_split_kernel[(n_splits * n_rb, hk, bsz)](
        q, k_cache, v_cache, cache_seqlens, out, opart, lpart, q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2), scale * LOG2E, chunk, n_splits, n_rb, hq,
        TQ=tq, GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT=split,
        DOT_PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=1 if interpreting() else 3,
    )  # fmt: skip
    if split:
        _decode_combine_kernel[(tq * hq, bsz)](
            opart, lpart, cache_seqlens, out, out.stride(0), out.stride(1), out.stride(2), chunk, n_splits, hq,
            TQ=tq, HEAD_DIM=d, BLOCK_D=bd, BLOCK_S=max(2, next_power_of_2(n_splits)), num_warps=4 if bd <= 128 else 8,
        )  # fmt: skip
    return out


__all__ = ["decode_num_splits", "kvcache_attention_fwd"]
