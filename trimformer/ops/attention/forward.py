"""Varlen flash-attention forward (Triton): bidirectional or causal, GQA, fp16/bf16/fp32, fp32 accumulation.

Math (FlashAttention-2, Dao 2023): for each query tile the keys of its own sequence are streamed in blocks with an
online softmax in base 2 (``log2(e)`` folded into the scale), so the score matrix never reaches memory. One program
owns one ``(query tile, head, sequence)``; tiles past a sequence's end exit at once, so padding costs nothing but an
empty program. Causal masks are applied only on the diagonal band of key blocks, the sequence-end mask only on the
last block. When the longest sequence fits one key block (short sequences, as ByteTransformer's fused short-MHA
kernel) the whole sequence is one tile and the softmax is computed directly, with no online rescaling loop.

A sliding window (``window=(left, right)``, ModernBERT's local layers) is a compile-time branch: the key loop covers
only the blocks the query tile's band touches, with the band mask applied on them; the global path is unchanged.

Head dims that are not powers of two are padded to the next power of two (at least 16) inside the tile with masked
loads and stores. Packed layout: ``q [T, Hq, D]``, ``k, v [T, Hk, D]`` (any token/head strides, unit stride on
``D``), ``cu_seqlens [N + 1]`` int32 on the device, ``max_seqlen`` a host int: no host syncs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.triton_utils import (
    TensorDescriptor,
    cdiv,
    dot_precision,
    dtype_reason,
    interpreting,
    next_power_of_2,
    num_sms,
    padded_head_dim,
    pdl_launch,
    pdl_trigger,
    pdl_wait,
    tma_device_reason,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class FwdConfig:
    """Launch configuration of the forward kernel (``block_n >= max_seqlen`` selects the single-tile path)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    #: read the full key / value blocks through TMA descriptors when the tensors allow it (:func:`kv_tma_reason`)
    tma: bool = False


@functools.lru_cache(maxsize=256)
def default_fwd_config(
    head_dim: int, max_seqlen: int, causal: bool, *, programs: int = 0, sms: int = 0, full: bool | None = None
) -> FwdConfig:
    """Hand-picked configuration (measured on H100, see NOTES.md); small blocks under the interpreter.

    ``programs`` is ``sequences x query heads``; when ``programs x query tiles`` would leave SMs idle (small batches),
    the query tile shrinks so that every SM gets work: down to 16 rows on the single-tile path, but not below 64 rows
    for bidirectional head dims <= 64 with several key blocks (H100 sweep, NOTES.md "Round 4": at B = 1 a 16- or
    32-row tile re-reads every key block per few rows and ran 1.3-1.7x slower than 64 rows at S = 256-512).
    ``full`` says whether the real work fills the GPU (``heads x tokens / 64 >= sms``; the launcher knows the token
    count, ``programs`` also counts a CUDA graph's empty and dummy sequences); ``None`` estimates it from ``programs``.
    """
    bd = padded_head_dim(head_dim)
    if interpreting():
        b = min(64, max(16, next_power_of_2(max_seqlen)))
        return FwdConfig(b, b, 4, 1)
    if bd <= 64 and max_seqlen <= 64:  # one tile holds the whole sequence
        b = max(16, next_power_of_2(max_seqlen))
        cfg = FwdConfig(b, b, 4, 1)
    elif bd <= 64 and max_seqlen <= 128:
        cfg = FwdConfig(64, 128, 4, 2)
    elif (
        bd <= 64
        and max_seqlen <= 512
        and not causal
        and not (programs * cdiv(max_seqlen, 64) >= sms if full is None else full)
    ):
        cfg = FwdConfig(64, 64, 4, 3)  # under one wave of real work (B = 1, S = 512: 6.6 us vs 8.8 for 128x64)
    elif bd <= 64 and max_seqlen <= 256 and not causal:
        cfg = FwdConfig(64, 32, 4, 3)  # B = 16 / 64, S = 256: 10.7 / 35.8 us vs 11.9 / 41.6 with 64-key blocks
    elif bd <= 64 and max_seqlen <= 384:
        cfg = FwdConfig(64, 64, 4, 3)
    elif bd <= 128:
        cfg = FwdConfig(128, 64, 8, 3)
    else:
        cfg = FwdConfig(128, 64, 8, 2)
    block_m = cfg.block_m
    floor = 64 if bd <= 64 and not causal and cfg.block_n < max_seqlen else 16
    while block_m > floor and programs * cdiv(max_seqlen, block_m) < sms:
        block_m //= 2
    if block_m != cfg.block_m:
        cfg = FwdConfig(block_m, cfg.block_n, min(cfg.num_warps, 4), cfg.num_stages)
    return cfg


def unsupported_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or ``None`` when they can.

    Args:
        q: ``[..., Hq, D]`` queries; k: ``[..., Hk, D]`` keys (validated for shape by ``api.py``).
    """
    reason = dtype_reason(q)
    if reason is not None:
        return reason
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        return f"head dim {d} (supported: 1..{MAX_HEAD_DIM})"
    if q.shape[-2] > _MAX_GRID_YZ:
        return f"{q.shape[-2]} query heads (at most {_MAX_GRID_YZ})"
    return None


@triton.jit
def _fwd_block_loop(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    stride_kt,
    stride_vt,
    lo,
    hi,
    offs_m,
    offs_n,
    d_ok,
    seqlen,
    qk_scale,
    win_left,
    win_right,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WINDOW: tl.constexpr = False,
    k_desc=None,
    v_desc=None,
    kv_row=0,
    kv_col=0,
    TMA: tl.constexpr = False,
):
    """Online-softmax over key blocks ``[lo, hi)``; ``k_ptrs``/``v_ptrs`` point at key row ``lo``. With ``WINDOW``
    key ``j`` is visible to query ``i`` only when ``i - win_left <= j <= i + win_right``. With ``TMA`` (unmasked
    blocks only) the blocks are read through the 2-D descriptors instead, key ``j`` at ``[kv_row + j, kv_col]``."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if TMA:
            k = k_desc.load([kv_row + start_n, kv_col])  # [BN, D]
            v = v_desc.load([kv_row + start_n, kv_col])
        elif MASK_KEYS:
            kmask = cols < seqlen
            k = tl.load(k_ptrs, mask=kmask[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
            v = tl.load(v_ptrs, mask=kmask[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BM, BN]
        if CAUSAL_MASK:
            s = tl.where((cols[None, :] <= offs_m[:, None]) & (cols[None, :] < seqlen), s, float("-inf"))
        elif MASK_KEYS:
            s = tl.where(cols[None, :] < seqlen, s, float("-inf"))
        if WINDOW:
            band = (cols[None, :] >= offs_m[:, None] - win_left) & (cols[None, :] <= offs_m[:, None] + win_right)
            s = tl.where(band, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if WINDOW:  # a row may see no key of this block yet: keep its max at -inf but subtract a finite one
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s * qk_scale - m_sub[:, None])
            alpha = tl.exp2(m_i - m_sub)
        else:
            p = tl.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _varlen_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    CU,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    qk_scale,
    n_m_blocks,
    win_left,
    win_right,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PREC: tl.constexpr,
    WINDOW: tl.constexpr = False,
    PDL: tl.constexpr = 0,
    k_desc=None,
    v_desc=None,
    TMA: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # heaviest (last) query tiles first: better load balance
        pid_m = n_m_blocks - 1 - pid_m
    hq = tl.program_id(1)
    seq = tl.program_id(2)
    pdl_wait(PDL)  # programmatic dependent launch: every input (cu_seqlens too) may come from the previous kernel
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
    rows = (bos + offs_m).to(tl.int64)
    q = tl.load(
        Q + rows[:, None] * stride_qt + hq * stride_qh + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0
    )  # [BM, BD]
    kv_rows = (bos + offs_n).to(tl.int64)
    k_ptrs = K + kv_rows[:, None] * stride_kt + kh * stride_kh + offs_d[None, :]  # [BN, BD]
    v_ptrs = V + kv_rows[:, None] * stride_vt + kh * stride_vh + offs_d[None, :]
    if WINDOW:  # only the key blocks the band of this query tile touches, every one masked
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        lo = (tl.maximum(start_m - win_left, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + win_right, seqlen)
        if CAUSAL:
            hi = tl.minimum(start_m + BLOCK_M, seqlen)
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs + lo.to(tl.int64) * stride_kt, v_ptrs + lo.to(tl.int64) * stride_vt,
            stride_kt, stride_vt, lo, hi, offs_m, offs_n, d_ok, seqlen, qk_scale, win_left, win_right,
            BLOCK_N, True, CAUSAL, EVEN_D, DOT_PREC, True,
        )  # fmt: skip
    elif SINGLE_TILE:
        kmask = offs_n < seqlen
        k = tl.load(k_ptrs, mask=kmask[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=kmask[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        valid = offs_n[None, :] < seqlen
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_i = tl.max(s, 1) * qk_scale
        p = tl.exp2(s * qk_scale - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            mid = ((start_m + 1) // BLOCK_N) * BLOCK_N  # key blocks below it are fully visible to every row
            hi = tl.minimum(start_m + BLOCK_M, seqlen)
        else:
            mid = (seqlen // BLOCK_N) * BLOCK_N  # full key blocks; the tail block is masked
            hi = seqlen
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, 0, mid, offs_m, offs_n, d_ok, seqlen, qk_scale,
            0, 0, BLOCK_N, False, False, EVEN_D, DOT_PREC, False, k_desc, v_desc, bos, kh * HEAD_DIM, TMA,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_block_loop(
            acc, l_i, m_i, q, k_ptrs + mid.to(tl.int64) * stride_kt, v_ptrs + mid.to(tl.int64) * stride_vt,
            stride_kt, stride_vt, mid, hi, offs_m, offs_n, d_ok, seqlen, qk_scale, 0, 0,
            BLOCK_N, True, CAUSAL, EVEN_D, DOT_PREC,
        )  # fmt: skip
    pdl_trigger(PDL)
    acc = acc / l_i[:, None]
    tl.store(
        O + rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    if STORE_LSE:  # natural-log logsumexp of the scaled logits
        tl.store(LSE + hq * stride_lh + bos + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=m_ok)


def kv_tma_reason(k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the full key / value blocks cannot be read through TMA descriptors, or ``None`` when they can.

    ``k``, ``v``: ``[T, Hk, D]``. Needs Triton's host descriptors, fp16/bf16 on a Hopper (sm_90+) GPU or the CPU
    interpreter, a power-of-two ``D >= 16`` (no padded columns), heads packed next to each other (head stride ``D``,
    so ``[T, Hk * D]`` is a 2-D view), and 16-byte aligned base pointers and token strides.
    """
    reason = tma_device_reason(k)
    if reason is not None:
        return reason
    d = k.shape[-1]
    if d != padded_head_dim(d):
        return f"head dim {d} is not a power of two >= 16"
    size = k.element_size()
    for name, t in (("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != d or t.data_ptr() % 16 or (t.stride(0) * size) % 16:
            return f"{name} strides {tuple(t.stride())} / pointer alignment do not allow a [T, Hk * D] descriptor"
    return None


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int) -> tuple:
    """2-D ``[T, Hk * D]`` descriptors of ``k`` and ``v`` with ``[block_n, D]`` blocks (rows past ``T`` read zeros)."""
    t, hk, d = k.shape
    return tuple(TensorDescriptor(x, [t, hk * d], [x.stride(0), 1], [block_n, d]) for x in (k, v))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def varlen_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    scale: float,
    return_lse: bool = False,
    config: FwdConfig | None = None,
    window: tuple[int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the varlen forward kernel. Inputs are assumed validated by ``api.py``.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hk, D]`` with ``Hq % Hk == 0``; fp16, bf16 or fp32; any token/head strides.
        cu_seqlens: ``[N + 1]`` int32 on q's device.
        max_seqlen: longest sequence (host int); sequences longer than it are computed only up to it.
        causal: token ``i`` sees tokens ``<= i`` of its own sequence.
        scale: logit scale.
        return_lse: also return the natural-log logsumexp of the scaled logits, ``[Hq, T]`` fp32.
        config: launch configuration override (benchmarks); default :func:`default_fwd_config`.
        window: ``(left, right)`` non-negative half-widths of a sliding window, or ``None`` (global attention).

    Returns:
        ``out [T, Hq, D]`` (contiguous, dtype of q), or ``(out, lse)`` when ``return_lse``.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    total, hq, d = q.shape
    hk = k.shape[1]
    out = torch.empty((total, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, total), dtype=torch.float32, device=q.device) if return_lse else out
    n_seq = cu_seqlens.numel() - 1
    if total == 0 or n_seq == 0 or max_seqlen <= 0:
        if return_lse:
            lse.fill_(float("-inf"))
            out.zero_()
        return (out, lse) if return_lse else out
    sms = num_sms(q.device)
    cfg = config or default_fwd_config(
        d, max_seqlen, causal, programs=n_seq * hq, sms=sms, full=hq * cdiv(total, 64) >= sms
    )
    n_m = cdiv(max_seqlen, cfg.block_m)
    qk_scale = scale * LOG2E
    pdl = pdl_launch(q.device, total)
    use_tma = cfg.tma and window is None and cfg.block_n < max_seqlen and kv_tma_reason(k, v) is None
    descs = dict(zip(("k_desc", "v_desc"), _kv_descriptors(k, v, cfg.block_n))) if use_tma else {}
    for s0 in range(0, n_seq, _MAX_GRID_YZ):
        n = min(_MAX_GRID_YZ, n_seq - s0)
        _varlen_fwd_kernel[(n_m, hq, n)](
            q, k, v, out, lse, cu_seqlens if s0 == 0 else cu_seqlens[s0:],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0) if return_lse else 0,
            qk_scale, n_m, 0 if window is None else window[0], 0 if window is None else window[1],
            GROUP=hq // hk, HEAD_DIM=d, BLOCK_D=padded_head_dim(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=bool(causal), SINGLE_TILE=cfg.block_n >= max_seqlen, STORE_LSE=return_lse,
            DOT_PREC=dot_precision(q.dtype), WINDOW=window is not None, TMA=use_tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl, **descs,
        )  # fmt: skip
    return (out, lse) if return_lse else out


def attention_flops(seqlens: list[int], heads: int, head_dim: int, *, causal: bool) -> float:
    """Matmul FLOPs of one forward over sequences of these lengths (2 matmuls, causal halves the work)."""
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in seqlens)
    return 4.0 * pairs * heads * head_dim


__all__ = [
    "FwdConfig",
    "attention_flops",
    "default_fwd_config",
    "kv_tma_reason",
    "unsupported_reason",
    "varlen_attention_fwd",
]
