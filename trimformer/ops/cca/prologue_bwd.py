"""Fused CCA / CCGQA prologue backward (Triton) and the autograd ``Function`` tying it to the forward.

Four launches (see ``prologue_fwd.py`` for the forward math and the coordinates):

1. **norm kernel**, one program per ``(token tile, head, document)``: recomputes ``z`` from the pre-conv latents
   (cheaper than saving it; with both convolutions as the folded forward does, one GEMM over ``P + 1`` row taps
   with the weights folded by one ``prologue_folded.launch_fold``), undoes RoPE (``g = R^T dout``) and the QK-norm,
   ``dz = (s / |z|) (g - w (w . g))`` with ``w = z / |z|`` and ``s = sqrt(d_h) beta``, and writes ``dY2 = dz`` in
   fp32; key heads also reduce ``dbeta = sqrt(d_h) sum w . g`` per tile and route ``dv`` back to ``v_cur`` and to
   the previous token's ``v_del`` (the value shift).
2. **dX kernel**, one program per ``(input-channel block, row chunk x head, document)``, over the rows
   ``r in [-P, L)`` of a document (the ``P`` rows before it are the initial conv state)::

       dY1[s] = sum_i W2_i^T dY2[s + (k2 - 1) - i]     (chunked tl.dot over the output channels of each tap)
       dX[r]  = sum_m w1[k1 - 1 - m] dY1[r + m] + qk-mean terms;   dw1_j += dY1[s] X[s - (k1 - 1) + j], db1 += dY1

3. **dW2 kernel**, one program per ``(tap x input-channel block, row chunk x head, document)``:
   ``dW2_i += dY2[s + (k2 - 1) - i]^T Y1[s]`` (``Y1`` recomputed from ``X``), ``db2 += dY2``.
4. **reduce kernel**: the weight gradients of kernels 1-3 are register sums over each program's rows, written as
   per-(document, chunk) partial rows of one buffer; one launch sums them and writes every parameter's gradient in its
   dtype. Deterministic, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.cca.prologue_folded import _folded_z, launch_fold
from trimformer.ops.cca.prologue_fwd import (
    NORM_EPS,
    FwdConfig,
    Meta,
    _chunk_cols,
    _head_latents,
    _head_rows,
    _head_scale,
    _head_z,
    _load_x,
    _y1_chunk,
    cca_prologue_fwd,
    conv2_transposed,
    last_unit,
)
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting, next_power_of_2, num_sms

_MAX_GRID = 65535


@dataclass(frozen=True)
class BwdConfig:
    """Launch configuration: norm kernel rows/warps, dX and dW2 kernels rows / input-channel block / warps, the
    rows each dX/dW2 program walks (0: chosen from the grid size, a multiple of ``block_t2``) and the dtype of the
    ``dY2`` scratch: ``"auto"`` (bf16 for bf16 input, which the conv2 dots round to anyway; fp32 otherwise, as fp16
    could overflow), ``"fp32"`` or ``"input"`` (the input dtype); ``norm_stages``: pipelining depth of the norm
    kernel's recomputation of ``z``, ``num_stages2`` that of the dX and dW2 kernels' loops; ``chunk_rows_w``: at
    least this many rows per dW2 program, and at least an eighth of the longest document's (0: as the dX kernel's)."""

    block_t1: int
    num_warps1: int
    block_t2: int
    block_b: int
    num_warps2: int
    chunk_rows: int = 0
    scratch: str = "auto"
    norm_stages: int = 1
    num_stages2: int = 1
    chunk_rows_w: int = 0

    def scratch_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of the ``dY2`` scratch for inputs of ``dtype``."""
        if self.scratch not in ("auto", "fp32", "input"):
            raise ValueError(f"BwdConfig.scratch must be 'auto', 'fp32' or 'input', got {self.scratch!r}")
        if self.scratch == "input" or (self.scratch == "auto" and dtype == torch.bfloat16):
            return dtype
        return torch.float32


def default_bwd_config(head_dim: int) -> BwdConfig:
    """Measured configuration (NOTES.md v8, H100, d_h 128): up to d_h 128, 64-row tiles of 4 warps everywhere, the
    norm kernel's folded recomputation pipelined 2 deep and dW2 programs over max(1024, L / 8) rows; at d_h 256,
    8 warps and 32-row dX/dW2 tiles (registers). Small tiles under the interpreter."""
    bd = max(16, next_power_of_2(head_dim))
    if interpreting():
        return BwdConfig(16, 4, 16, bd, 4)
    if bd <= 128:
        return BwdConfig(64, 4, 64, min(bd, 64), 4, norm_stages=2, chunk_rows_w=1024)
    return BwdConfig(64, 8, 32, 64, 8)


@triton.jit
def _cca_bwd_norm_kernel(
    Q0, K0, W1, B1, W2T, B2, MF, BF, TEMP, COS, SIN, CU, CST, DQ, DK, DV, DY2, DVC, DVD, DVS, DBETA,
    s_q0, s_k0, s_w1c, s_w1k, s_t0, s_t1, s_m0, s_m1, s_cos, s_sin, s_cn, s_cc, s_cp,
    s_dqt, s_dqh, s_dkt, s_dkh, s_dvt, s_dvh, s_dy, s_dvc, s_dvd, s_dvsn, n_tiles, sqrt_dh, eps,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
    RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, P: tl.constexpr,
    NUM_CONVS: tl.constexpr, QK_MEAN: tl.constexpr, VALUE_SHIFT: tl.constexpr, EXP_TEMP: tl.constexpr,
    HAS_CST: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_DVS: tl.constexpr, BT: tl.constexpr,
    DOT_PREC: tl.constexpr, FOLDED: tl.constexpr, HAS_BF: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    hh = tl.program_id(1)
    n = tl.program_id(2)
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    beta_slot = DBETA + (n * n_tiles + tile) * HK + tl.maximum(hh - HQ, 0)
    if tile * BT >= seqlen:
        if hh >= HQ:
            tl.store(beta_slot, 0.0)
        return
    offs = tile * BT + tl.arange(0, BT)
    row_ok = offs < seqlen
    grow = bos + offs
    docs = offs * 0 + n
    G: tl.constexpr = HQ // HK
    if FOLDED:  # both convolutions as one GEMM over the latents, as the prefill forward computes z
        za, zb, zc = _folded_z(Q0, s_q0, K0, s_k0, MF, s_m0, s_m1, BF, CST, s_cn, s_cc, s_cp, hh, grow, offs, docs,
                               row_ok, HQ, G, DH, BD, BK, HALF, RB, NOPE, NB, P, QK_MEAN, HAS_CST, HAS_BF, True,
                               DOT_PREC)  # fmt: skip
    else:
        za, zb, zc = _head_z(Q0, s_q0, K0, s_k0, W1, s_w1c, s_w1k, B1, W2T, s_t0, s_t1, B2, CST, s_cn, s_cc, s_cp,
                             hh, grow, offs, docs, row_ok, HQ, G, DH, BD, BK, HALF, RB, NOPE, NB, K1, K2, P, NUM_CONVS,
                             QK_MEAN, HAS_CST, HAS_B1, HAS_B2, DOT_PREC)  # fmt: skip
    nrm = tl.sqrt(tl.sum(za * za, 1) + tl.sum(zb * zb, 1) + tl.sum(zc * zc, 1))
    inv = 1.0 / tl.maximum(nrm, eps)
    g64 = grow.to(tl.int64)[:, None]
    D, sd = _head_rows(DQ, s_dqh, s_dqt, DK, s_dkh, s_dkt, hh, HQ)
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    ok_r = row_ok[:, None] & (ra < HALF)[None, :]
    ok_n = row_ok[:, None] & (rn < NOPE)[None, :]
    ga = tl.zeros([BT, RB], dtype=tl.float32)
    gb = tl.zeros([BT, RB], dtype=tl.float32)
    gc = tl.zeros([BT, NB], dtype=tl.float32)
    if HALF > 0:  # g = R^T dout (rotate-half RoPE is orthogonal)
        da = tl.load(D + g64 * sd + ra[None, :], mask=ok_r, other=0.0).to(tl.float32)
        db = tl.load(D + g64 * sd + HALF + ra[None, :], mask=ok_r, other=0.0).to(tl.float32)
        cs = tl.load(COS + g64 * s_cos + ra[None, :], mask=ok_r, other=0.0).to(tl.float32)
        sn = tl.load(SIN + g64 * s_sin + ra[None, :], mask=ok_r, other=0.0).to(tl.float32)
        ga = da * cs + db * sn
        gb = db * cs - da * sn
    if NOPE > 0:
        gc = tl.load(D + g64 * sd + 2 * HALF + rn[None, :], mask=ok_n, other=0.0).to(tl.float32)
    zg = (tl.sum(za * ga, 1) + tl.sum(zb * gb, 1) + tl.sum(zc * gc, 1)) * inv  # w . g, [BT]
    coef = (_head_scale(TEMP, hh, sqrt_dh, HQ, EXP_TEMP) * inv)[:, None]
    corr = tl.where(nrm > eps, zg * inv, 0.0)[:, None]  # |z| clamped at eps: no gradient through the norm
    Y = DY2 + g64 * s_dy + hh * DH
    if HALF > 0:
        tl.store(Y + ra[None, :], (coef * (ga - corr * za)).to(DY2.dtype.element_ty), mask=ok_r)
        tl.store(Y + HALF + ra[None, :], (coef * (gb - corr * zb)).to(DY2.dtype.element_ty), mask=ok_r)
    if NOPE > 0:
        tl.store(Y + 2 * HALF + rn[None, :], (coef * (gc - corr * zc)).to(DY2.dtype.element_ty), mask=ok_n)
    VHALF: tl.constexpr = HK * DH // 2
    rd = tl.arange(0, BD)
    if hh >= HQ:
        j = hh - HQ
        tl.store(beta_slot, sqrt_dh * tl.sum(tl.where(row_ok, zg, 0.0), 0))
        fc = j * DH + rd
        ok_v = row_ok[:, None] & (rd < DH)[None, :]
        cur = (fc < VHALF)[None, :]
        dv = tl.load(DV + g64 * s_dvt + j * s_dvh + rd[None, :], mask=ok_v, other=0.0)
        tl.store(DVC + g64 * s_dvc + fc[None, :], dv, mask=ok_v & cur)
        fd = (fc - VHALF)[None, :]
        if VALUE_SHIFT:  # token t's delayed half came from v_del[t - 1]; the document's last v_del is unused
            tl.store(DVD + (g64 - 1) * s_dvd + fd, dv, mask=ok_v & (~cur) & (offs[:, None] >= 1))
            tl.store(DVD + g64 * s_dvd + fd, tl.zeros_like(dv), mask=ok_v & (~cur) & (offs[:, None] == seqlen - 1))
            if HAS_DVS:
                tl.store(DVS + n.to(tl.int64) * s_dvsn + fd + offs[:, None] * 0, dv.to(DVS.dtype.element_ty),
                         mask=ok_v & (~cur) & (offs[:, None] == 0))  # fmt: skip
        else:
            tl.store(DVD + g64 * s_dvd + fd, dv, mask=ok_v & (~cur))


@triton.jit
def _dy1(DY2, s_dy, W2T, s_t0, s_t1, bos, seqlen, c0, r, r_ok, m, b, b_ok, DT: tl.constexpr, BD: tl.constexpr,
         BK: tl.constexpr, DH: tl.constexpr, K2: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """``dY1[r + m, b] = sum_i sum_a dY2[r + m + (k2 - 1) - i, a] W2[a, b, i]`` as fp32 ``[BT, BB]``."""
    acc = tl.zeros([r.shape[0], b.shape[0]], dtype=tl.float32)
    for kc in range(0, K2 * BD, BK):
        i = kc // BD
        a = _chunk_cols(kc, BD, BK)
        t = r + m + (K2 - 1) - i
        ok = (r_ok & (t >= 0) & (t < seqlen))[:, None] & (a < DH)[None, :]
        d2 = tl.load(DY2 + (bos + t).to(tl.int64)[:, None] * s_dy + c0 + a[None, :], mask=ok, other=0.0)
        w = tl.load(W2T + i * s_t0 + (c0 + a)[:, None] * s_t1 + b[None, :], mask=(a < DH)[:, None] & b_ok[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(d2.to(DT), w.to(DT), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _cca_bwd_dx_kernel(
    Q0, K0, DY2, W1, B1, W2T, CU, CST, DQ0, DK0, DCS, PART,
    s_q0, s_k0, s_dy, s_w1c, s_w1k, s_t0, s_t1, s_cn, s_cc, s_cp, s_dq0, s_dk0, s_dcn, s_dcc, s_dcp,
    n_chunks, chunk_rows, ltot, o_w1, o_b1,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, BB: tl.constexpr,
    K1: tl.constexpr, K1P: tl.constexpr, K2: tl.constexpr, P: tl.constexpr, NUM_CONVS: tl.constexpr,
    QK_MEAN: tl.constexpr, HAS_CST: tl.constexpr, HAS_DCS: tl.constexpr, BT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    bb = tl.program_id(0)
    H: tl.constexpr = HQ + HK
    G: tl.constexpr = HQ // HK
    chunk = tl.program_id(1) // H
    hh = tl.program_id(1) % H
    n = tl.program_id(2)
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    row = PART + (n * n_chunks + chunk).to(tl.int64) * ltot
    c0 = hh * DH
    b = bb * BB + tl.arange(0, BB)
    b_ok = b < DH
    X, sx = _head_latents(Q0, s_q0, K0, s_k0, hh, HQ, DH)
    DX, sdx = _head_latents(DQ0, s_dq0, DK0, s_dk0, hh, HQ, DH)
    DT = Q0.dtype.element_ty
    jidx = tl.arange(0, K1P)
    acc_w1 = tl.zeros([K1P, BB], dtype=tl.float32)
    acc_b1 = tl.zeros([BB], dtype=tl.float32)
    w1_last = tl.load(W1 + (c0 + b) * s_w1c + (K1 - 1) * s_w1k, mask=b_ok, other=0.0).to(tl.float32)
    r_lo = chunk * chunk_rows - P
    r_hi = tl.minimum(r_lo + chunk_rows, seqlen)
    docs = tl.zeros([BT], dtype=tl.int32) + n
    for r0 in range(r_lo, r_hi, BT):
        r = r0 + tl.arange(0, BT)
        r_ok = r < r_hi
        inside = r_ok & (r >= 0)
        gr = (bos + r).to(tl.int64)[:, None]
        ok_in = inside[:, None] & b_ok[None, :]
        dy1_0 = tl.zeros([BT, BB], dtype=tl.float32)
        if NUM_CONVS == 2:
            dy1_0 = _dy1(DY2, s_dy, W2T, s_t0, s_t1, bos, seqlen, c0, r, r_ok, 0, b, b_ok, DT, BD, BK, DH, K2,
                         DOT_PREC)  # fmt: skip
            dx = w1_last[None, :] * dy1_0
            for m in tl.static_range(1, K1):
                w1m = tl.load(W1 + (c0 + b) * s_w1c + (K1 - 1 - m) * s_w1k, mask=b_ok, other=0.0).to(tl.float32)
                dx += w1m[None, :] * _dy1(DY2, s_dy, W2T, s_t0, s_t1, bos, seqlen, c0, r, r_ok, m, b, b_ok, DT, BD,
                                          BK, DH, K2, DOT_PREC)  # fmt: skip
        elif NUM_CONVS == 1:
            dy1_0 = tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0).to(tl.float32)
            dx = w1_last[None, :] * dy1_0
            for m in tl.static_range(1, K1):
                ok_m = (r_ok & (r + m >= 0) & (r + m < seqlen))[:, None] & b_ok[None, :]
                w1m = tl.load(W1 + (c0 + b) * s_w1c + (K1 - 1 - m) * s_w1k, mask=b_ok, other=0.0).to(tl.float32)
                d2m = tl.load(DY2 + (gr + m) * s_dy + c0 + b[None, :], mask=ok_m, other=0.0).to(tl.float32)
                dx += w1m[None, :] * d2m
        else:
            dx = tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0).to(tl.float32)
        if QK_MEAN:  # z_q[h] += (q0[h] + k0[h // g]) / 2,  z_k[j] += (mean_group q0 + k0[j]) / 2
            if hh < HQ:
                dx += 0.5 * tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0).to(tl.float32)
                kcol = (HQ + hh // G) * DH
                dx += (0.5 / G) * tl.load(DY2 + gr * s_dy + kcol + b[None, :], mask=ok_in, other=0.0).to(tl.float32)
            else:
                j = hh - HQ
                acc = tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0).to(tl.float32)
                for h in range(j * G, j * G + G):
                    acc += tl.load(DY2 + gr * s_dy + h * DH + b[None, :], mask=ok_in, other=0.0).to(tl.float32)
                dx += 0.5 * acc
        tl.store(DX + gr * sdx + b[None, :], dx.to(DX.dtype.element_ty), mask=ok_in)
        if HAS_DCS:  # rows before the document: gradient of the initial conv state
            dcs = DCS + n.to(tl.int64) * s_dcn + (c0 + b[None, :]) * s_dcc + (P + r)[:, None] * s_dcp
            tl.store(dcs, dx.to(DCS.dtype.element_ty), mask=(r_ok & (r < 0))[:, None] & b_ok[None, :])
        if NUM_CONVS >= 1:
            for j in tl.static_range(K1):
                xj = _load_x(X, sx, CST, s_cn, s_cc, s_cp, c0, bos + r, r, docs, r_ok, b, b_ok, K1 - 1 - j, P,
                             HAS_CST)  # fmt: skip
                acc_w1 += tl.where(jidx[:, None] == j, tl.sum(dy1_0 * xj, 0)[None, :], 0.0)
            acc_b1 += tl.sum(dy1_0, 0)
    if NUM_CONVS >= 1:  # partial rows: dw1 at o_w1 ([C, K1] layout), db1 at o_b1
        tl.store(row + o_w1 + (c0 + b)[None, :] * K1 + jidx[:, None], acc_w1, mask=(jidx < K1)[:, None] & b_ok[None, :])
        tl.store(row + o_b1 + c0 + b, acc_b1, mask=b_ok)


@triton.jit
def _cca_bwd_dw2_kernel(
    Q0, K0, DY2, W1, B1, CU, CST, PART,
    s_q0, s_k0, s_dy, s_w1c, s_w1k, s_cn, s_cc, s_cp, n_chunks, chunk_rows, ltot, o_b2,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BB: tl.constexpr, K1: tl.constexpr,
    K2: tl.constexpr, P: tl.constexpr, HAS_CST: tl.constexpr, HAS_B1: tl.constexpr, BT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    NBB: tl.constexpr = BD // BB
    i = tl.program_id(0) // NBB
    bb = tl.program_id(0) % NBB
    H: tl.constexpr = HQ + HK
    chunk = tl.program_id(1) // H
    hh = tl.program_id(1) % H
    n = tl.program_id(2)
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    row = PART + (n * n_chunks + chunk).to(tl.int64) * ltot
    c0 = hh * DH
    X, sx = _head_latents(Q0, s_q0, K0, s_k0, hh, HQ, DH)
    DT = Q0.dtype.element_ty
    a = tl.arange(0, BD)
    a_ok = a < DH
    b = bb * BB + tl.arange(0, BB)
    b_ok = b < DH
    acc = tl.zeros([BD, BB], dtype=tl.float32)
    acc_b2 = tl.zeros([BD], dtype=tl.float32)
    r_lo = chunk * chunk_rows - P
    r_hi = tl.minimum(r_lo + chunk_rows, seqlen)
    docs = tl.zeros([BT], dtype=tl.int32) + n
    for r0 in range(r_lo, r_hi, BT):
        r = r0 + tl.arange(0, BT)
        r_ok = r < r_hi
        t = r + (K2 - 1) - i  # dW2_i[a, b] += dY2[t, a] Y1[r, b]
        ok = (r_ok & (t >= 0) & (t < seqlen))[:, None] & a_ok[None, :]
        d2 = tl.load(DY2 + (bos + t).to(tl.int64)[:, None] * s_dy + c0 + a[None, :], mask=ok, other=0.0).to(tl.float32)
        y1 = _y1_chunk(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, bos + r, r, docs, r_ok, b, b_ok,
                       K2 - 1, K1, K2, P, HAS_CST, HAS_B1)  # fmt: skip
        acc = tl.dot(tl.trans(d2.to(DT)), y1.to(DT), acc, input_precision=DOT_PREC)
        acc_b2 += tl.sum(d2, 0)
    tl.store(row + (c0 + a)[:, None] * (DH * K2) + b[None, :] * K2 + i, acc, mask=a_ok[:, None] & b_ok[None, :])
    if (bb == 0) & (i == K2 - 1):  # t = r: the bias gradient
        tl.store(row + o_b2 + c0 + a, acc_b2, mask=a_ok)


@triton.jit
def _reduce_kernel(PART, PARTW, PBETA, DW2, DB2, DW1, DB1, DTEMP, TEMP, n_slots, n_slots_w, n_slots_b, ltot, n_blocks,
                   o_b2, o_w1, o_b1, HK: tl.constexpr, HKP: tl.constexpr, EXP_TEMP: tl.constexpr, HAS_W2: tl.constexpr,
                   HAS_B2: tl.constexpr, HAS_W1: tl.constexpr, HAS_B1: tl.constexpr, BE: tl.constexpr):  # fmt: skip
    """Sum the partial rows ``PARTW [n_slots_w, ltot]`` (columns before ``o_w1``: dW2 kernel), ``PART [n_slots,
    ltot]`` (columns from ``o_w1``: dX kernel) and ``PBETA [n_slots_b, HK]``, and store each gradient."""
    pid = tl.program_id(0)
    # (the two branches use distinct names: a runtime if/else may not re-bind one name to tiles of two shapes)
    if pid < n_blocks:
        e = pid * BE + tl.arange(0, BE)
        ok = e < ltot
        acc_e = tl.zeros([BE], dtype=tl.float32)
        if pid * BE < o_w1:
            ptr_w = PARTW + e  # advanced row by row: 64-bit pointer arithmetic, no int32 overflow
            for _s in range(0, n_slots_w):
                acc_e += tl.load(ptr_w, mask=ok & (e < o_w1), other=0.0)
                ptr_w += ltot
        if pid * BE + BE > o_w1:
            ptr_e = PART + e
            for _s in range(0, n_slots):
                acc_e += tl.load(ptr_e, mask=ok & (e >= o_w1), other=0.0)
                ptr_e += ltot
        if HAS_W2:
            tl.store(DW2 + e, acc_e, mask=e < o_b2)
        if HAS_B2:
            tl.store(DB2 + (e - o_b2), acc_e, mask=(e >= o_b2) & (e < o_w1))
        if HAS_W1:
            tl.store(DW1 + (e - o_w1), acc_e, mask=(e >= o_w1) & (e < o_b1))
        if HAS_B1:
            tl.store(DB1 + (e - o_b1), acc_e, mask=(e >= o_b1) & ok)
    else:
        jh = tl.arange(0, HKP)
        acc_t = tl.zeros([HKP], dtype=tl.float32)
        ptr_t = PBETA + jh
        for _t in range(0, n_slots_b):
            acc_t += tl.load(ptr_t, mask=jh < HK, other=0.0)
            ptr_t += HK
        if EXP_TEMP:  # beta = exp(T): dT = dbeta * beta
            acc_t *= tl.exp(tl.load(TEMP + jh, mask=jh < HK, other=0.0).to(tl.float32))
        tl.store(DTEMP + jh, acc_t, mask=jh < HK)


def _chunk_rows(cfg: BwdConfig, ext_len: int, programs_per_chunk: int, device: torch.device) -> int:
    """Rows per dX/dW2 program: enough programs to fill the GPU (~4 per SM), else as long as possible."""
    if cfg.chunk_rows:
        return cdiv(cfg.chunk_rows, cfg.block_t2) * cfg.block_t2
    want = max(1, cdiv(4 * num_sms(device), max(1, programs_per_chunk)))
    rows = cdiv(max(ext_len, 1), want)
    return max(cfg.block_t2, cdiv(rows, cfg.block_t2) * cfg.block_t2)


def _opt(x: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return x if x is not None else dummy


def cca_prologue_bwd(meta: Meta, dq, dk, dv, q0, k0, w1, b1, w2t, b2, temperature, cos, sin, cu, max_seqlen, cst,
                     vst_shape, *, need_cst_grad: bool, config: BwdConfig | None = None,
                     folded: tuple[torch.Tensor, torch.Tensor | None] | None = None):  # fmt: skip
    """Gradients of the prologue (see the module docstring). Tensors as saved by :class:`CCAPrologueFunction`
    (``w2t`` is ``conv2_weight.permute(2, 0, 1)`` contiguous; ``cst`` only when ``P > 0``; ``folded``: the forward's
    ``launch_fold`` output, else the weights are folded here when both convolutions are present).

    Returns:
        ``(dq0, dk0, dv_cur, dv_del, dw1, db1, dw2, db2, dtemperature, dconv_state, dvalue_state)``; entries for
        absent inputs are ``None``.
    """
    cfg = config or default_bwd_config(meta.dh)
    dev, dt = q0.device, q0.dtype
    t, n_seq = q0.shape[0], cu.numel() - 1
    h, dh, k1, k2 = meta.hq + meta.hk, meta.dh, meta.k1, meta.k2
    c, ck = h * dh, meta.hk * dh
    ce = meta.constexprs()
    pad, convs = meta.pad, meta.num_convs
    empty = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype, device=dev)
    dq, dk, dv = (torch.zeros(t, hd, dh, dtype=dt, device=dev) if g is None else last_unit(g)
                  for g, hd in ((dq, meta.hq), (dk, meta.hk), (dv, meta.hk)))  # fmt: skip
    dy2 = empty(t, c, dtype=cfg.scratch_dtype(dt))
    dvc, dvd = empty(t, ck // 2), empty(t, ck // 2)
    dvs = torch.zeros(vst_shape, dtype=dt, device=dev) if vst_shape is not None else None
    dq0, dk0 = empty(t, meta.hq * dh), empty(t, ck)
    dcs = empty(n_seq, c, pad) if need_cst_grad and pad else None
    tiles = cdiv(max_seqlen, cfg.block_t1)
    pbeta = empty(max(1, n_seq * tiles), meta.hk, dtype=torch.float32)
    if n_seq * tiles == 0:
        pbeta.zero_()
    bb = min(cfg.block_b, ce["BD"])
    nbb = ce["BD"] // bb
    chunk = _chunk_rows(cfg, max_seqlen + pad, nbb * h * n_seq, dev)
    n_chunks = cdiv(max_seqlen + pad, chunk)
    # the dW2 kernel's programs walk longer chunks than the dX kernel's: fewer partial rows to write and sum
    want_w = max(cfg.chunk_rows_w, (max_seqlen + pad) // 8) if cfg.chunk_rows_w else 0
    chunk_w = max(chunk, cdiv(want_w, cfg.block_t2) * cfg.block_t2) if convs == 2 else chunk
    n_chunks_w = cdiv(max_seqlen + pad, chunk_w)
    # partial rows of kernels 2-3: [dw2 (C, d_h, k2) | db2 (C) | dw1 (C, k1) | db1 (C)]
    o_b2 = c * dh * k2 if convs == 2 else 0
    o_w1 = o_b2 + (c if convs == 2 else 0)
    o_b1 = o_w1 + (c * k1 if convs >= 1 else 0)
    ltot = o_b1 + (c if convs >= 1 else 0)
    slots, slots_w = max(1, n_seq * n_chunks), max(1, n_seq * n_chunks_w)
    part = empty(slots, max(1, ltot), dtype=torch.float32)  # dX kernel: the dw1 | db1 columns
    part_w = empty(slots_w, max(1, ltot), dtype=torch.float32) if convs == 2 else part  # dW2: dw2 | db2
    if convs and n_seq * n_chunks == 0:
        part.zero_()
        part_w.zero_()
    w1s = w1.stride() if w1 is not None else (0, 0)
    ts = (w2t.stride(0), w2t.stride(1)) if w2t is not None else (0, 0)
    cs = cst.stride() if cst is not None else (0, 0, 0)
    dummy = dy2
    prec = dot_precision(dt)
    # z is recomputed as the folded prefill forward computes it (one GEMM over the latents, NOTES.md v8)
    if folded is None and convs == 2:
        folded = launch_fold(w1, b1, w2t.permute(1, 2, 0), b2, dt)
    mf, bf = folded if convs == 2 else (None, None)
    common = dict(HQ=meta.hq, HK=meta.hk, DH=dh, BD=ce["BD"], K1=k1, K2=k2, P=pad, HAS_CST=cst is not None)
    for s0 in range(0, n_seq, _MAX_GRID):
        n = min(_MAX_GRID, n_seq - s0)
        cu_s = cu[s0:] if s0 else cu
        cst_s = _opt(cst[s0:] if cst is not None else None, dummy)
        if tiles:
            _cca_bwd_norm_kernel[(tiles, h, n)](
                q0, k0, _opt(w1, dummy), _opt(b1, dummy), _opt(w2t, dummy), _opt(b2, dummy), _opt(mf, dummy),
                _opt(bf, dummy), temperature, _opt(cos, dummy), _opt(sin, dummy), cu_s, cst_s, dq, dk, dv, dy2, dvc,
                dvd, _opt(dvs[s0:] if dvs is not None else None, dummy), pbeta[s0 * tiles :],
                q0.stride(0), k0.stride(0), *w1s, *ts, *(mf.stride()[:2] if mf is not None else (0, 0)),
                cos.stride(0) if cos is not None else 0,
                sin.stride(0) if sin is not None else 0, *cs, dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
                dv.stride(0), dv.stride(1), dy2.stride(0), dvc.stride(0), dvd.stride(0),
                dvs.stride(0) if dvs is not None else 0, tiles, float(dh) ** 0.5, NORM_EPS,
                **common, BK=ce["BK"], HALF=ce["HALF"], RB=ce["RB"], NOPE=ce["NOPE"], NB=ce["NB"], NUM_CONVS=convs,
                QK_MEAN=meta.qk_mean, VALUE_SHIFT=meta.value_shift, EXP_TEMP=meta.exp_temp, HAS_B1=b1 is not None,
                HAS_B2=b2 is not None, HAS_DVS=dvs is not None, BT=cfg.block_t1, DOT_PREC=prec,
                FOLDED=mf is not None, HAS_BF=bf is not None, num_warps=cfg.num_warps1, num_stages=cfg.norm_stages,
            )  # fmt: skip
        if not n_chunks:
            continue
        part_s = part[s0 * n_chunks :]
        _cca_bwd_dx_kernel[(nbb, n_chunks * h, n)](
            q0, k0, dy2, _opt(w1, dummy), _opt(b1, dummy), _opt(w2t, dummy), cu_s, cst_s, dq0, dk0,
            _opt(dcs[s0:] if dcs is not None else None, dummy), part_s,
            q0.stride(0), k0.stride(0), dy2.stride(0), *w1s, *ts, *cs, dq0.stride(0), dk0.stride(0),
            *(dcs.stride() if dcs is not None else (0, 0, 0)), n_chunks, chunk, ltot, o_w1, o_b1,
            **common, BK=ce["BK"], BB=bb, K1P=next_power_of_2(k1), NUM_CONVS=convs, QK_MEAN=meta.qk_mean,
            HAS_DCS=dcs is not None, BT=cfg.block_t2, DOT_PREC=prec, num_warps=cfg.num_warps2,
            num_stages=cfg.num_stages2,
        )  # fmt: skip
        if convs == 2:
            _cca_bwd_dw2_kernel[(k2 * nbb, n_chunks_w * h, n)](
                q0, k0, dy2, w1, _opt(b1, dummy), cu_s, cst_s, part_w[s0 * n_chunks_w :], q0.stride(0), k0.stride(0),
                dy2.stride(0), *w1s, *cs, n_chunks_w, chunk_w, ltot, o_b2, **common, BB=bb, HAS_B1=b1 is not None,
                BT=cfg.block_t2, DOT_PREC=prec, num_warps=cfg.num_warps2, num_stages=cfg.num_stages2,
            )  # fmt: skip
    grad = lambda x, shape: empty(*shape, dtype=x.dtype) if x is not None else None
    dw2 = grad(w2t, (c, dh, k2)) if convs == 2 else None
    db2, dw1, db1 = grad(b2, (c,)), grad(w1, (c, k1)), grad(b1, (c,))
    dtemp = empty(meta.hk, dtype=temperature.dtype)
    be = 1024 if not interpreting() else 4096
    n_blocks = cdiv(ltot, be) if convs else 0
    _reduce_kernel[(n_blocks + 1,)](
        part, part_w, pbeta, _opt(dw2, dummy), _opt(db2, dummy), _opt(dw1, dummy), _opt(db1, dummy), dtemp,
        temperature, slots, slots_w, pbeta.shape[0], max(1, ltot), n_blocks, o_b2, o_w1, o_b1, HK=meta.hk,
        HKP=next_power_of_2(meta.hk), EXP_TEMP=meta.exp_temp, HAS_W2=dw2 is not None, HAS_B2=db2 is not None,
        HAS_W1=dw1 is not None, HAS_B1=db1 is not None, BE=be,
    )  # fmt: skip
    return dq0, dk0, dvc, dvd, dw1, db1, dw2, db2, dtemp, dcs, dvs


class CCAPrologueFunction(torch.autograd.Function):
    """Autograd wrapper of the fused prologue (prefill; no final states). ``cos``/``sin`` get no gradient."""

    @staticmethod
    def forward(ctx, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cst, vst, cos, sin, cu, max_seqlen, meta,
                fwd_config, bwd_config):  # fmt: skip
        q0, k0, v_cur, v_del = (last_unit(x) for x in (q0, k0, v_cur, v_del))
        w2t = conv2_transposed(w2)
        mf, bf = launch_fold(w1, b1, w2, b2, q0.dtype) if meta.num_convs == 2 else (None, None)  # fwd and bwd
        q, k, v, _ = cca_prologue_fwd(meta, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, cu,
                                      max_seqlen, cst, vst, False, config=fwd_config, w2t=w2t,
                                      folded=(mf, bf) if mf is not None else None)  # fmt: skip
        ctx.save_for_backward(q0, k0, w1, b1, w2t, b2, temperature, cst, cos, sin, cu, mf, bf)
        ctx.meta, ctx.max_seqlen, ctx.bwd_config = meta, max_seqlen, bwd_config
        ctx.vst_shape = tuple(vst.shape) if vst is not None else None
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        q0, k0, w1, b1, w2t, b2, temperature, cst, cos, sin, cu, mf, bf = ctx.saved_tensors
        meta = ctx.meta
        need_cst = cst is not None and ctx.needs_input_grad[9]
        grads = cca_prologue_bwd(meta, dq, dk, dv, q0, k0, w1, b1, w2t, b2, temperature, cos, sin, cu,
                                 ctx.max_seqlen, cst if meta.pad else None, ctx.vst_shape, need_cst_grad=need_cst,
                                 config=ctx.bwd_config, folded=(mf, bf) if mf is not None else None)  # fmt: skip
        dq0, dk0, dvc, dvd, dw1, db1, dw2, db2, dtemp, dcs, dvs = grads
        if need_cst and dcs is None:  # P == 0: an empty state
            dcs = torch.zeros_like(cst)
        need = ctx.needs_input_grad
        out = (dq0, dk0, dvc, dvd, dw1, db1, dw2, db2, dtemp, dcs, dvs)
        return (*(g if need[i] else None for i, g in enumerate(out)), None, None, None, None, None, None, None)


def cca_prologue_autograd(meta: Meta, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, cu_seqlens,
                          max_seqlen, initial_conv_state, initial_value_state, *,
                          fwd_config: FwdConfig | None = None, bwd_config: BwdConfig | None = None):  # fmt: skip
    """Differentiable fused prologue: ``(q, k, v)`` (see :func:`trimformer.ops.cca.cca_prologue`)."""
    return CCAPrologueFunction.apply(q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, initial_conv_state,
                                     initial_value_state, cos, sin, cu_seqlens, max_seqlen, meta, fwd_config,
                                     bwd_config)  # fmt: skip


__all__ = ["BwdConfig", "CCAPrologueFunction", "cca_prologue_autograd", "cca_prologue_bwd", "default_bwd_config"]
