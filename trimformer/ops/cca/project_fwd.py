"""CCA prefill forward fused into the down-projection GEMM: ``x -> (q, k, v)`` in one launch (inference).

The prologue's convolutions are causal over a few rows, so a projection tile of ``BM`` rows can finish them in its
epilogue if it starts ``P = (k1 - 1) + (k2 - 1)`` rows early: tile ``p`` computes the projections of the rows
``[p (BM - P) - P, p (BM - P) + BM - P)`` and writes the last ``BM - P`` of them (``P`` rows of overlap, 3% at
``BM = 64``, ``P = 2``). Tiles run over the packed tokens and may span documents: each row finds its document by
a binary search in ``cu_seqlens`` and every shift masks rows whose source lies before its document's start.

One program owns one row tile and either one kv group (kv head ``j`` and its ``g`` query heads) or one block of
value columns:

* kv group: ``k0 = x W_K[j]`` (kept in registers, input dtype), then per query head ``h``: ``q0 = x W_Q[h]`` ->
  conv1 -> conv2 -> + qk-mean ``(q0 + k0) / 2`` -> QK-norm -> RoPE -> store; last the key head with the mean of its
  group's ``q0``. The GEMMs run in the head's column blocks (rotated halves and NoPE part, as in
  ``prologue_fwd._head_z``) so the mean and RoPE stay elementwise.
* value block: ``x W_V`` stored in place, or ``x W_V'`` stored one row down (the value shift; a document's first row
  takes the initial value state).

A row shift of a register tile is a ``tl.gather`` along its rows (a 0/1 shift-matrix ``tl.dot`` made Triton 3.6 emit
out-of-range shared-memory accesses on the H100; NOTES.md, v5). conv1 and conv2 round as the two-kernel forward
does (``q0`` and ``Y1`` in the input dtype, fp32 accumulation), so the result is that of projections in the input
dtype followed by :func:`trimformer.ops.cca.cca_prologue`, up to fp32 summation order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import triton
import triton.language as tl

from trimformer.ops.cca.prologue_fwd import NORM_EPS, Meta, _store_qk
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting, next_power_of_2

MAX_TILES = 65535  # grid dim 1: row tiles


@dataclass(frozen=True)
class ProjectConfig:
    """Launch configuration: ``block_m`` rows per tile (``block_m - P`` written), ``block_k`` reduction chunk of the
    projection GEMMs, ``num_warps`` and the pipelining depth ``num_stages`` of the GEMM loops."""

    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=64)
def default_project_config(head_dim: int) -> ProjectConfig:
    """The fastest of the v5 sweep (NOTES.md): 128-row tiles, 8 warps, 3 stages; 16-row tiles and no pipelining
    under the interpreter."""
    if interpreting():
        return ProjectConfig(16, 16, 4, 1)
    return ProjectConfig(128, 64, 8, 3)


@triton.jit
def _gemm_block(X, sx, g, src_ok, W, s_wn, n0, cols, col_ok, E, acc, BK: tl.constexpr, DOT_PREC: tl.constexpr):
    """``acc + x[g] @ W[n0 + cols]^T`` (fp32 ``[BM, W]``) over the ``E`` input features; ``W`` is ``[N, E]``."""
    rk = tl.arange(0, BK)
    g64 = g.to(tl.int64)
    for k0 in range(0, E, BK):
        k = k0 + rk
        k_ok = k < E
        a = tl.load(X + g64[:, None] * sx + k[None, :], mask=src_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(W + (n0 + cols)[None, :].to(tl.int64) * s_wn + k[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _project(X, sx, g, src_ok, W, s_wn, BIAS, n0, E, HAS_BIAS: tl.constexpr, HALF: tl.constexpr, RB: tl.constexpr,
             NOPE: tl.constexpr, NB: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """One head's projection ``x W[n0 : n0 + d_h]^T (+ b)`` in the input dtype, as its three column blocks
    ``[BM, RB], [BM, RB], [BM, NB]`` (rotated halves, NoPE part; masked columns 0)."""
    DT = X.dtype.element_ty
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    ok_h = ra < HALF
    ok_n = rn < NOPE
    pa = tl.zeros([g.shape[0], RB], dtype=tl.float32)
    pb = tl.zeros([g.shape[0], RB], dtype=tl.float32)
    pc = tl.zeros([g.shape[0], NB], dtype=tl.float32)
    if HALF > 0:
        pa = _gemm_block(X, sx, g, src_ok, W, s_wn, n0, ra, ok_h, E, pa, BK, DOT_PREC)
        pb = _gemm_block(X, sx, g, src_ok, W, s_wn, n0 + HALF, ra, ok_h, E, pb, BK, DOT_PREC)
        if HAS_BIAS:
            pa += tl.load(BIAS + n0 + ra, mask=ok_h, other=0.0).to(tl.float32)[None, :]
            pb += tl.load(BIAS + n0 + HALF + ra, mask=ok_h, other=0.0).to(tl.float32)[None, :]
    if NOPE > 0:
        pc = _gemm_block(X, sx, g, src_ok, W, s_wn, n0 + 2 * HALF, rn, ok_n, E, pc, BK, DOT_PREC)
        if HAS_BIAS:
            pc += tl.load(BIAS + n0 + 2 * HALF + rn, mask=ok_n, other=0.0).to(tl.float32)[None, :]
    return pa.to(DT), pb.to(DT), pc.to(DT)


@triton.jit
def _shift(y, offs, s: tl.constexpr):
    """Rows ``r - s`` of ``y [BM, W]`` at row ``r`` (fp32), 0 where the row is within ``s`` of its document start."""
    r = tl.arange(0, y.shape[0])
    src = tl.broadcast_to(tl.maximum(r - s, 0)[:, None], y.shape)
    return tl.where((offs >= s)[:, None], tl.gather(y, src, 0).to(tl.float32), 0.0)


@triton.jit
def _conv_in_block(y0, offs, W1, s_w1c, s_w1k, B1, W2B, s_w0, s_w1, cin, c_ok, c0, za, zb, zc,
                   HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, K1: tl.constexpr,
                   K2: tl.constexpr, HAS_B1: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Add the conv2 contribution of one input column block (head-local columns ``cin``, ``y0 [BM, W]`` its
    pre-conv latents in the input dtype) to the output blocks ``za, zb, zc``: conv1 of the block (rounded to the
    input dtype), then each conv2 tap's row-shifted ``Y1 @ W2[i][cin, :]``. Rows before a document's start hold
    ``Y1 = b1`` (conv1 of the zero padding)."""
    DT = y0.dtype
    y1 = tl.zeros(y0.shape, dtype=tl.float32)
    for j in tl.static_range(K1):
        wj = tl.load(W1 + (c0 + cin) * s_w1c + j * s_w1k, mask=c_ok, other=0.0).to(tl.float32)
        if j == K1 - 1:
            y1 += wj[None, :] * y0.to(tl.float32)
        else:
            y1 += wj[None, :] * _shift(y0, offs, K1 - 1 - j)
    b1 = tl.zeros([cin.shape[0]], dtype=tl.float32)
    if HAS_B1:
        b1 = tl.load(B1 + c0 + cin, mask=c_ok, other=0.0).to(DT).to(tl.float32)
        y1 += b1[None, :]
    y1 = y1.to(DT)
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    ok_h = ra < HALF
    ok_n = rn < NOPE
    for i in tl.static_range(K2):
        if i == K2 - 1:
            ys = y1
        else:  # conv2 tap i reads Y1 of row t - (k2 - 1 - i)
            ys = _shift(y1, offs, K2 - 1 - i) + tl.where(offs[:, None] < K2 - 1 - i, b1[None, :], 0.0)
            ys = ys.to(DT)
        WB = W2B + i * s_w0 + cin[:, None] * s_w1 + c0
        if HALF > 0:
            wa = tl.load(WB + ra[None, :], mask=c_ok[:, None] & ok_h[None, :], other=0.0).to(DT)
            za = tl.dot(ys, wa, za, input_precision=DOT_PREC)
            wb = tl.load(WB + HALF + ra[None, :], mask=c_ok[:, None] & ok_h[None, :], other=0.0).to(DT)
            zb = tl.dot(ys, wb, zb, input_precision=DOT_PREC)
        if NOPE > 0:
            wc = tl.load(WB + 2 * HALF + rn[None, :], mask=c_ok[:, None] & ok_n[None, :], other=0.0).to(DT)
            zc = tl.dot(ys, wc, zc, input_precision=DOT_PREC)
    return za, zb, zc


@triton.jit
def _head_conv(pa, pb, pc, offs, W1, s_w1c, s_w1k, B1, W2B, s_w0, s_w1, B2, c0,
               HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, K1: tl.constexpr,
               K2: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """conv2(conv1(head)) + b2 of the head whose channels start at ``c0``, as fp32 column blocks."""
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    ok_h = ra < HALF
    ok_n = rn < NOPE
    za = tl.zeros(pa.shape, dtype=tl.float32)
    zb = tl.zeros(pb.shape, dtype=tl.float32)
    zc = tl.zeros(pc.shape, dtype=tl.float32)
    if HALF > 0:
        za, zb, zc = _conv_in_block(pa, offs, W1, s_w1c, s_w1k, B1, W2B, s_w0, s_w1, ra, ok_h, c0, za, zb, zc,
                                    HALF, RB, NOPE, NB, K1, K2, HAS_B1, DOT_PREC)  # fmt: skip
        za, zb, zc = _conv_in_block(pb, offs, W1, s_w1c, s_w1k, B1, W2B, s_w0, s_w1, HALF + ra, ok_h, c0, za, zb,
                                    zc, HALF, RB, NOPE, NB, K1, K2, HAS_B1, DOT_PREC)  # fmt: skip
    if NOPE > 0:
        za, zb, zc = _conv_in_block(pc, offs, W1, s_w1c, s_w1k, B1, W2B, s_w0, s_w1, 2 * HALF + rn, ok_n, c0, za,
                                    zb, zc, HALF, RB, NOPE, NB, K1, K2, HAS_B1, DOT_PREC)  # fmt: skip
    if HAS_B2:
        za += tl.load(B2 + c0 + ra, mask=ok_h, other=0.0).to(tl.float32)[None, :]
        zb += tl.load(B2 + c0 + HALF + ra, mask=ok_h, other=0.0).to(tl.float32)[None, :]
        zc += tl.load(B2 + c0 + 2 * HALF + rn, mask=ok_n, other=0.0).to(tl.float32)[None, :]
    return za, zb, zc


@triton.jit
def _project_prologue_kernel(
    X, WQ, WK, WVC, WVD, QB, KB, VCB, VDB, W1, B1, W2B, B2, TEMP, COS, SIN, CU, VST, Q, K, V,
    n_rows, E, s_x, s_wq, s_wk, s_wvc, s_wvd, s_w1c, s_w1k, s_w0, s_w1, s_cos, s_sin, s_vsn,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, sqrt_dh, eps,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr,
    NB: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, P: tl.constexpr, QK_MEAN: tl.constexpr,
    VALUE_SHIFT: tl.constexpr, EXP_TEMP: tl.constexpr, HAS_LB: tl.constexpr, HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr, HAS_VST: tl.constexpr, VH: tl.constexpr, BV: tl.constexpr, NVB: tl.constexpr,
    N_DOCS: tl.constexpr, LOG_DOCS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Rows ``[p (BM - P), p (BM - P) + BM - P)`` (``p = program_id(1)``) of kv group ``program_id(0)`` (query and
    key heads), or of value block ``program_id(0) - HK``."""
    unit = tl.program_id(0)
    r = tl.arange(0, BM)
    g = tl.program_id(1) * (BM - P) - P + r  # global rows; the first P are halo
    src_ok = (g >= 0) & (g < n_rows)
    out_ok = (r >= P) & src_ok
    # document of each row: the last i with cu[i] <= g (empty documents share their start with the next one)
    gq = tl.minimum(tl.maximum(g, 0), n_rows - 1)
    lo = gq * 0
    hi = lo + N_DOCS
    for _ in tl.static_range(LOG_DOCS):
        mid = (lo + hi) // 2
        ge = tl.load(CU + mid) <= gq
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid)
    bos = tl.load(CU + lo)
    offs = g - bos  # in-document offset (rows before the tensor: negative, masked everywhere)
    G: tl.constexpr = HQ // HK
    if unit < HK:
        j = unit
        ka, kb, kc = _project(X, s_x, g, src_ok, WK, s_wk, KB, j * DH, E, HAS_LB, HALF, RB, NOPE, NB, BK, DOT_PREC)
        sa = tl.zeros([BM, RB], dtype=tl.float32)
        sb = tl.zeros([BM, RB], dtype=tl.float32)
        sc = tl.zeros([BM, NB], dtype=tl.float32)
        for h in range(j * G, j * G + G):
            qa, qb, qc = _project(X, s_x, g, src_ok, WQ, s_wq, QB, h * DH, E, HAS_LB, HALF, RB, NOPE, NB, BK,
                                  DOT_PREC)  # fmt: skip
            za, zb, zc = _head_conv(qa, qb, qc, offs, W1, s_w1c, s_w1k, B1, W2B, s_w0, s_w1, B2, h * DH, HALF, RB,
                                    NOPE, NB, K1, K2, HAS_B1, HAS_B2, DOT_PREC)  # fmt: skip
            if QK_MEAN:
                sa += qa.to(tl.float32)
                sb += qb.to(tl.float32)
                sc += qc.to(tl.float32)
                za += 0.5 * (qa.to(tl.float32) + ka.to(tl.float32))
                zb += 0.5 * (qb.to(tl.float32) + kb.to(tl.float32))
                zc += 0.5 * (qc.to(tl.float32) + kc.to(tl.float32))
            _store_qk(za, zb, zc, TEMP, COS, SIN, Q, K, s_cos, s_sin, s_qt, s_qh, s_kt, s_kh, h, g, out_ok, sqrt_dh,
                      eps, HQ, HALF, RB, NOPE, NB, EXP_TEMP)  # fmt: skip
        za, zb, zc = _head_conv(ka, kb, kc, offs, W1, s_w1c, s_w1k, B1, W2B, s_w0, s_w1, B2, (HQ + j) * DH, HALF, RB,
                                NOPE, NB, K1, K2, HAS_B1, HAS_B2, DOT_PREC)  # fmt: skip
        if QK_MEAN:
            za += 0.5 * (sa / G + ka.to(tl.float32))
            zb += 0.5 * (sb / G + kb.to(tl.float32))
            zc += 0.5 * (sc / G + kc.to(tl.float32))
        _store_qk(za, zb, zc, TEMP, COS, SIN, Q, K, s_cos, s_sin, s_qt, s_qh, s_kt, s_kh, HQ + j, g, out_ok, sqrt_dh,
                  eps, HQ, HALF, RB, NOPE, NB, EXP_TEMP)  # fmt: skip
    else:
        vb = unit - HK
        delayed = vb >= NVB
        cols = (vb % NVB) * BV + tl.arange(0, BV)
        col_ok = cols < VH
        acc = tl.zeros([BM, BV], dtype=tl.float32)
        if delayed:
            acc = _gemm_block(X, s_x, g, src_ok, WVD, s_wvd, 0, cols, col_ok, E, acc, BK, DOT_PREC)
            if HAS_LB:
                acc += tl.load(VDB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            acc = _gemm_block(X, s_x, g, src_ok, WVC, s_wvc, 0, cols, col_ok, E, acc, BK, DOT_PREC)
            if HAS_LB:
                acc += tl.load(VCB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        fc = tl.where(delayed, VH, 0) + cols  # flat value column -> (kv head, dim)
        vcol = (fc // DH) * s_vh + fc % DH
        val = acc.to(V.dtype.element_ty)
        rows_v = g.to(tl.int64)[:, None] * s_vt + vcol[None, :]
        if VALUE_SHIFT and delayed:
            # row g's delayed value belongs to row g + 1 of its document; first rows take the value state
            eos = tl.load(CU + lo + 1)
            nxt = (r >= P - 1) & (r < BM - 1) & (g >= 0) & (g + 1 < eos)
            tl.store(V + rows_v + s_vt, val, mask=nxt[:, None] & col_ok[None, :])
            starts = g == tl.load(CU + lo)  # (not offs == 0: Triton 3.6 fails to compile that comparison here)
            first = out_ok[:, None] & starts[:, None] & col_ok[None, :]
            if HAS_VST:
                init = tl.load(VST + lo.to(tl.int64)[:, None] * s_vsn + cols[None, :], mask=first, other=0.0)
                tl.store(V + rows_v, init.to(V.dtype.element_ty), mask=first)
            else:
                tl.store(V + rows_v, tl.zeros([BM, BV], dtype=V.dtype.element_ty), mask=first)
        else:
            tl.store(V + rows_v, val, mask=out_ok[:, None] & col_ok[None, :])


def launch_project_fwd(meta: Meta, x, wq, wk, wvc, wvd, bq, bk, bvc, bvd, w1, b1, w2b, b2, temperature, cos, sin, cu,
                       vst, q, k, v, *, config: ProjectConfig | None = None) -> None:  # fmt: skip
    """Write ``q [T, h, d_h]``, ``k, v [T, h_k, d_h]`` from ``x [T, E]`` (validated by ``api.py``; every last dim
    unit-stride, ``w2b`` = :func:`trimformer.ops.cca.prologue_gemm.conv2_k_major` of the conv2 weight)."""
    rows, e = x.shape
    if rows == 0:
        return
    if meta.num_convs != 2:
        raise ValueError(f"the fused projection forward needs both convolutions, got {meta.num_convs}")
    cfg = config or default_project_config(meta.dh)
    pad = meta.pad
    if cfg.block_m <= pad or cfg.block_m & (cfg.block_m - 1):
        raise ValueError(f"ProjectConfig.block_m must be a power of two above P={pad}, got {cfg.block_m}")
    ce = meta.constexprs()
    tiles = cdiv(rows, cfg.block_m - pad)
    if tiles > MAX_TILES:
        raise ValueError(f"{rows} rows need {tiles} tiles of {cfg.block_m - pad}; at most {MAX_TILES} are supported")
    vh = meta.hk * meta.dh // 2
    bv = min(128, next_power_of_2(max(vh, 16)))
    nvb = cdiv(vh, bv)
    n_docs = cu.numel() - 1
    has_lb = bq is not None
    dummy = x
    _project_prologue_kernel[(meta.hk + 2 * nvb, tiles)](
        x, wq, wk, wvc, wvd, bq if has_lb else dummy, bk if has_lb else dummy, bvc if has_lb else dummy,
        bvd if has_lb else dummy, w1, b1 if b1 is not None else dummy, w2b, b2 if b2 is not None else dummy,
        temperature, cos if cos is not None else dummy, sin if sin is not None else dummy, cu,
        vst if vst is not None else dummy, q, k, v,
        rows, e, x.stride(0), wq.stride(0), wk.stride(0), wvc.stride(0), wvd.stride(0), *w1.stride(), w2b.stride(0),
        w2b.stride(1), cos.stride(0) if cos is not None else 0, sin.stride(0) if sin is not None else 0,
        vst.stride(0) if vst is not None else 0, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), math.sqrt(meta.dh), NORM_EPS,
        HQ=meta.hq, HK=meta.hk, DH=meta.dh, HALF=ce["HALF"], RB=ce["RB"], NOPE=ce["NOPE"], NB=ce["NB"], K1=meta.k1,
        K2=meta.k2, P=pad, QK_MEAN=meta.qk_mean, VALUE_SHIFT=meta.value_shift, EXP_TEMP=meta.exp_temp,
        HAS_LB=has_lb, HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_VST=vst is not None, VH=vh, BV=bv, NVB=nvb,
        N_DOCS=n_docs, LOG_DOCS=max(1, n_docs.bit_length()), BM=cfg.block_m, BK=cfg.block_k,
        DOT_PREC=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


__all__ = ["ProjectConfig", "default_project_config", "launch_project_fwd"]
