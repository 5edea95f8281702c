"""Fused CCA / CCGQA prologue backward (Triton) and the autograd ``Function`` tying it to the forward.

Two launches (see ``prologue_fwd.py`` for the forward math and the coordinates):

1. **norm kernel**, one program per ``(token tile, head, document)``: recomputes ``z`` from the pre-conv latents
   (cheaper than saving it), undoes RoPE (``g = R^T dout``) and the QK-norm,
   ``dz = (s / |z|) (g - w (w . g))`` with ``w = z / |z|`` and ``s = sqrt(d_h) beta``, and writes ``dY2 = dz`` in
   fp32; key heads also reduce ``dbeta = sqrt(d_h) sum w . g`` per tile and route ``dv`` back to ``v_cur`` and to
   the previous token's ``v_del`` (the value shift).
2. **conv kernel**, one program per ``(input-column block, row chunk x head, document)``, over the rows
   ``r in [-P, L)`` of a document (the ``P`` rows before it are the initial conv state)::

       dY1[s] = sum_i W2_i^T dY2[s + (k2 - 1) - i]     one tl.dot, taps stacked along the reduction axis
       dX[r]  = sum_m w1[k1 - 1 - m] dY1[r + m] + qk-mean terms
       dW2_i += dY2[s + (k2 - 1) - i]^T Y1[s]           (Y1 recomputed from X), db2 += dY2
       dw1_j += dY1[s] * X[s - (k1 - 1) + j],           db1 += dY1[s]

   Weight gradients are accumulated in registers over the program's chunk of rows and written as per-chunk
   partial sums, reduced afterwards by one ``sum`` per parameter: deterministic, no atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.cca.prologue_fwd import (
    NORM_EPS,
    FwdConfig,
    Meta,
    _head_scale,
    _head_z,
    _load_x,
    cca_prologue_fwd,
    default_fwd_config,
    last_unit,
)
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting, next_power_of_2, num_sms

_MAX_GRID = 65535


@dataclass(frozen=True)
class BwdConfig:
    """Launch configuration of the backward: norm kernel rows, conv kernel rows/columns, rows per conv program."""

    block_t1: int
    num_warps1: int
    block_t2: int
    block_b: int
    num_warps2: int
    chunk_rows: int = 0  # 0: chosen from the grid size (a multiple of block_t2)


def default_bwd_config(head_dim: int) -> BwdConfig:
    """Hand-picked configuration (see NOTES.md); small tiles under the interpreter."""
    bd = max(16, next_power_of_2(head_dim))
    if interpreting():
        return BwdConfig(16, 4, 16, bd, 4)
    fwd = default_fwd_config(head_dim)
    if bd <= 64:
        return BwdConfig(fwd.block_t, fwd.num_warps, 64, bd, 4)
    if bd <= 128:
        return BwdConfig(fwd.block_t, fwd.num_warps, 32, 64, 8)
    return BwdConfig(fwd.block_t, fwd.num_warps, 32, 32, 8)


@triton.jit
def _cca_bwd_norm_kernel(
    Q0, K0, W1, B1, W2, B2, TEMP, COS, SIN, CU, CST, DQ, DK, DV, DY2, DVC, DVD, DVS, DBETA,
    s_q0, s_k0, s_w1c, s_w1k, s_w2o, s_w2i, s_w2k, s_cos, s_sin, s_cn, s_cc, s_cp,
    s_dqt, s_dqh, s_dkt, s_dkh, s_dvt, s_dvh, s_dy, s_dvc, s_dvd, s_dvsn, n_tiles, sqrt_dh, eps,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, HALF: tl.constexpr, RB: tl.constexpr,
    NOPE: tl.constexpr, NB: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K2P: tl.constexpr, P: tl.constexpr,
    NUM_CONVS: tl.constexpr, QK_MEAN: tl.constexpr, VALUE_SHIFT: tl.constexpr, EXP_TEMP: tl.constexpr,
    HAS_CST: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_DVS: tl.constexpr, BT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    hh = tl.program_id(1)
    n = tl.program_id(2)
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    if tile * BT >= seqlen:
        return
    offs = tile * BT + tl.arange(0, BT)
    row_ok = offs < seqlen
    grow = bos + offs
    docs = offs * 0 + n
    G: tl.constexpr = HQ // HK
    za, zb, zc = _head_z(Q0, s_q0, K0, s_k0, W1, s_w1c, s_w1k, B1, W2, s_w2o, s_w2i, s_w2k, B2, CST, s_cn, s_cc,
                         s_cp, hh, grow, offs, docs, row_ok, HQ, G, DH, BD, HALF, RB, NOPE, NB, K1, K2, K2P, P,
                         NUM_CONVS, QK_MEAN, HAS_CST, HAS_B1, HAS_B2, DOT_PREC)  # fmt: skip
    nrm = tl.sqrt(tl.sum(za * za, 1) + tl.sum(zb * zb, 1) + tl.sum(zc * zc, 1))
    inv = 1.0 / tl.maximum(nrm, eps)
    g64 = grow.to(tl.int64)[:, None]
    if hh < HQ:
        D = DQ + hh * s_dqh
    else:
        D = DK + (hh - HQ) * s_dkh
    sd = tl.where(hh < HQ, s_dqt, s_dkt)
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
        tl.store(Y + ra[None, :], coef * (ga - corr * za), mask=ok_r)
        tl.store(Y + HALF + ra[None, :], coef * (gb - corr * zb), mask=ok_r)
    if NOPE > 0:
        tl.store(Y + 2 * HALF + rn[None, :], coef * (gc - corr * zc), mask=ok_n)
    VHALF: tl.constexpr = HK * DH // 2
    rd = tl.arange(0, BD)
    if hh >= HQ:
        j = hh - HQ
        tl.store(DBETA + (n * n_tiles + tile) * HK + j, sqrt_dh * tl.sum(tl.where(row_ok, zg, 0.0), 0))
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
def _stacked_dy2(DY2, s_dy, bos, seqlen, c0, r, r_ok, m, q_tap, q_dim, q_ok, K2: tl.constexpr):
    """``[BT, K2P * BD]`` fp32: column ``(i, a)`` of row ``r`` is ``dY2[r + m + (k2 - 1) - i, a]`` (0 outside the
    document), so that ``dY1[r + m] = this @ W2cat``."""
    t = r[:, None] + m + (K2 - 1) - q_tap[None, :]
    ok = r_ok[:, None] & q_ok[None, :] & (t >= 0) & (t < seqlen)
    return tl.load(DY2 + (bos + t).to(tl.int64) * s_dy + c0 + q_dim[None, :], mask=ok, other=0.0)


@triton.jit
def _cca_bwd_conv_kernel(
    Q0, K0, DY2, W1, B1, W2, CU, CST, DQ0, DK0, DCS, PW2, PB2, PW1, PB1,
    s_q0, s_k0, s_dy, s_w1c, s_w1k, s_w2o, s_w2i, s_w2k, s_cn, s_cc, s_cp, s_dq0, s_dk0, s_dcn, s_dcc, s_dcp,
    n_chunks, chunk_rows,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BB: tl.constexpr, K1: tl.constexpr,
    K1P: tl.constexpr, K2: tl.constexpr, K2P: tl.constexpr, P: tl.constexpr, NUM_CONVS: tl.constexpr,
    QK_MEAN: tl.constexpr, HAS_CST: tl.constexpr, HAS_DCS: tl.constexpr, HAS_B1: tl.constexpr, BT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    bb = tl.program_id(0)
    H: tl.constexpr = HQ + HK
    G: tl.constexpr = HQ // HK
    chunk = tl.program_id(1) // H
    hh = tl.program_id(1) % H
    n = tl.program_id(2)
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    slot = (n * n_chunks + chunk).to(tl.int64)
    C: tl.constexpr = H * DH
    c0 = hh * DH
    b = bb * BB + tl.arange(0, BB)
    b_ok = b < DH
    if hh < HQ:
        X = Q0 + hh * DH
        DX = DQ0 + hh * DH
    else:
        X = K0 + (hh - HQ) * DH
        DX = DK0 + (hh - HQ) * DH
    sx = tl.where(hh < HQ, s_q0, s_k0)
    sdx = tl.where(hh < HQ, s_dq0, s_dk0)
    DT = Q0.dtype.element_ty
    KC: tl.constexpr = K2P * BD
    q = tl.arange(0, KC)
    q_tap = q // BD
    q_dim = q % BD
    q_ok = (q_tap < K2) & (q_dim < DH)
    jidx = tl.arange(0, K1P)
    if NUM_CONVS == 2:  # W2cat[(i, a), b] = W2[c0 + a, b, i]
        wcat = tl.load(W2 + (c0 + q_dim)[:, None] * s_w2o + b[None, :] * s_w2i + q_tap[:, None] * s_w2k,
                       mask=q_ok[:, None] & b_ok[None, :], other=0.0).to(DT)  # fmt: skip
    acc_w2 = tl.zeros([KC, BB], dtype=tl.float32)
    acc_b2 = tl.zeros([KC], dtype=tl.float32)
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
        if NUM_CONVS == 2:
            a0 = _stacked_dy2(DY2, s_dy, bos, seqlen, c0, r, r_ok, 0, q_tap, q_dim, q_ok, K2)
            dy1_0 = tl.dot(a0.to(DT), wcat, input_precision=DOT_PREC)  # dY1[r], [BT, BB]
            dx = w1_last[None, :] * dy1_0
            for m in tl.static_range(1, K1):
                am = _stacked_dy2(DY2, s_dy, bos, seqlen, c0, r, r_ok, m, q_tap, q_dim, q_ok, K2)
                w1m = tl.load(W1 + (c0 + b) * s_w1c + (K1 - 1 - m) * s_w1k, mask=b_ok, other=0.0).to(tl.float32)
                dx += w1m[None, :] * tl.dot(am.to(DT), wcat, input_precision=DOT_PREC)
        elif NUM_CONVS == 1:
            dy1_0 = tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0)
            dx = w1_last[None, :] * dy1_0
            for m in tl.static_range(1, K1):
                ok_m = (r_ok & (r + m >= 0) & (r + m < seqlen))[:, None] & b_ok[None, :]
                w1m = tl.load(W1 + (c0 + b) * s_w1c + (K1 - 1 - m) * s_w1k, mask=b_ok, other=0.0).to(tl.float32)
                dx += w1m[None, :] * tl.load(DY2 + (gr + m) * s_dy + c0 + b[None, :], mask=ok_m, other=0.0)
        else:
            dx = tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0)
        if QK_MEAN:  # z_q[h] += (q0[h] + k0[h // g]) / 2,  z_k[j] += (mean_group q0 + k0[j]) / 2
            if hh < HQ:
                dx += 0.5 * tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0)
                kcol = (HQ + hh // G) * DH
                dx += (0.5 / G) * tl.load(DY2 + gr * s_dy + kcol + b[None, :], mask=ok_in, other=0.0)
            else:
                j = hh - HQ
                acc = tl.load(DY2 + gr * s_dy + c0 + b[None, :], mask=ok_in, other=0.0)
                for h in range(j * G, j * G + G):
                    acc += tl.load(DY2 + gr * s_dy + h * DH + b[None, :], mask=ok_in, other=0.0)
                dx += 0.5 * acc
        tl.store(DX + gr * sdx + b[None, :], dx.to(DX.dtype.element_ty), mask=ok_in)
        if HAS_DCS:  # rows before the document: gradient of the initial conv state
            dcs = DCS + n.to(tl.int64) * s_dcn + (c0 + b[None, :]) * s_dcc + (P + r)[:, None] * s_dcp
            tl.store(dcs, dx.to(DCS.dtype.element_ty), mask=(r_ok & (r < 0))[:, None] & b_ok[None, :])
        if NUM_CONVS >= 1:
            y1 = tl.zeros([BT, BB], dtype=tl.float32)
            for j in tl.static_range(K1):
                xj = _load_x(X, sx, CST, s_cn, s_cc, s_cp, c0, bos + r, r, docs, r_ok, b, b_ok, K1 - 1 - j, P,
                             HAS_CST)  # fmt: skip
                w1j = tl.load(W1 + (c0 + b) * s_w1c + j * s_w1k, mask=b_ok, other=0.0).to(tl.float32)
                y1 += w1j[None, :] * xj
                acc_w1 += tl.where(jidx[:, None] == j, tl.sum(dy1_0 * xj, 0)[None, :], 0.0)
            acc_b1 += tl.sum(dy1_0, 0)
            if NUM_CONVS == 2:
                if HAS_B1:
                    y1 += tl.load(B1 + c0 + b, mask=b_ok, other=0.0).to(tl.float32)[None, :]
                acc_w2 = tl.dot(tl.trans(a0.to(DT)), y1.to(DT), acc_w2, input_precision=DOT_PREC)
                acc_b2 += tl.sum(a0, 0)
    if NUM_CONVS == 2:  # partial sums of this (document, chunk): PW2 [slots, C, DH, K2], PB2 [slots, C]
        pw2 = PW2 + slot * (C * DH * K2) + (c0 + q_dim)[:, None] * (DH * K2) + b[None, :] * K2 + q_tap[:, None]
        tl.store(pw2, acc_w2, mask=q_ok[:, None] & b_ok[None, :])
        if bb == 0:
            tl.store(PB2 + slot * C + c0 + q_dim, acc_b2, mask=q_ok & (q_tap == K2 - 1))
    if NUM_CONVS >= 1:  # PW1 [slots, C, K1], PB1 [slots, C]
        pw1 = PW1 + slot * (C * K1) + (c0 + b)[None, :] * K1 + jidx[:, None]
        tl.store(pw1, acc_w1, mask=(jidx < K1)[:, None] & b_ok[None, :])
        tl.store(PB1 + slot * C + c0 + b, acc_b1, mask=b_ok)


def _chunk_rows(cfg: BwdConfig, ext_len: int, programs_per_chunk: int, device: torch.device) -> int:
    """Rows per conv-kernel program: enough programs to fill the GPU (~4 per SM), else as long as possible."""
    if cfg.chunk_rows:
        return cdiv(cfg.chunk_rows, cfg.block_t2) * cfg.block_t2
    want = max(1, cdiv(4 * num_sms(device), max(1, programs_per_chunk)))
    rows = cdiv(max(ext_len, 1), want)
    return max(cfg.block_t2, cdiv(rows, cfg.block_t2) * cfg.block_t2)


def cca_prologue_bwd(meta: Meta, dq, dk, dv, q0, k0, w1, b1, w2, b2, temperature, cos, sin, cu, max_seqlen, cst,
                     vst_shape, *, need_cst_grad: bool, config: BwdConfig | None = None):  # fmt: skip
    """Gradients of the prologue (see the module docstring). Tensors as saved by :class:`CCAPrologueFunction`.

    Returns:
        ``(dq0, dk0, dv_cur, dv_del, dw1, db1, dw2, db2, dtemperature, dconv_state, dvalue_state)``; entries for
        absent inputs are ``None``.
    """
    cfg = config or default_bwd_config(meta.dh)
    dev, dt = q0.device, q0.dtype
    t, n_seq = q0.shape[0], cu.numel() - 1
    h, dh = meta.hq + meta.hk, meta.dh
    c, ck = h * dh, meta.hk * dh
    ce = meta.constexprs()
    pad = meta.pad
    dq = torch.zeros(t, meta.hq, dh, dtype=dt, device=dev) if dq is None else last_unit(dq)
    dk = torch.zeros(t, meta.hk, dh, dtype=dt, device=dev) if dk is None else last_unit(dk)
    dv = torch.zeros(t, meta.hk, dh, dtype=dt, device=dev) if dv is None else last_unit(dv)
    dy2 = torch.empty(t, c, dtype=torch.float32, device=dev)
    dvc = torch.empty(t, ck // 2, dtype=dt, device=dev)
    dvd = torch.empty(t, ck // 2, dtype=dt, device=dev)
    dvs = torch.zeros(vst_shape, dtype=torch.float32, device=dev) if vst_shape is not None else None
    dq0 = torch.empty(t, meta.hq * dh, dtype=dt, device=dev)
    dk0 = torch.empty(t, ck, dtype=dt, device=dev)
    dcs = torch.empty(n_seq, c, pad, dtype=torch.float32, device=dev) if need_cst_grad and pad else None
    tiles = cdiv(max_seqlen, cfg.block_t1)
    dbeta = torch.zeros(max(1, n_seq * tiles), meta.hk, dtype=torch.float32, device=dev)
    bb = min(cfg.block_b, ce["BD"])
    nbb = ce["BD"] // bb
    chunk = _chunk_rows(cfg, max_seqlen + pad, nbb * h * n_seq, dev)
    n_chunks = cdiv(max_seqlen + pad, chunk)
    slots = max(1, n_seq * n_chunks)
    pw2 = torch.empty(slots, c, dh, meta.k2, dtype=torch.float32, device=dev) if meta.num_convs == 2 else None
    pb2 = torch.empty(slots, c, dtype=torch.float32, device=dev) if meta.num_convs == 2 else None
    pw1 = torch.empty(slots, c, meta.k1, dtype=torch.float32, device=dev) if meta.num_convs >= 1 else None
    pb1 = torch.empty(slots, c, dtype=torch.float32, device=dev) if meta.num_convs >= 1 else None
    if meta.num_convs and n_seq * n_chunks == 0:
        for p in (pw2, pb2, pw1, pb1):
            if p is not None:
                p.zero_()
    w1s = w1.stride() if w1 is not None else (0, 0)
    w2s = w2.stride() if w2 is not None else (0, 0, 0)
    cs = cst.stride() if cst is not None else (0, 0, 0)
    dummy = dy2
    opt = lambda x: x if x is not None else dummy
    prec = dot_precision(dt)
    conv_ce = {k: ce[k] for k in ("HQ", "HK", "DH", "BD", "K1", "K2", "K2P", "P", "NUM_CONVS", "QK_MEAN")}
    for s0 in range(0, n_seq, _MAX_GRID):
        n = min(_MAX_GRID, n_seq - s0)
        cu_s = cu[s0:] if s0 else cu
        cst_s = cst[s0:] if cst is not None else None
        if tiles:
            _cca_bwd_norm_kernel[(tiles, h, n)](
                q0, k0, opt(w1), opt(b1), opt(w2), opt(b2), temperature, opt(cos), opt(sin), cu_s, opt(cst_s),
                dq, dk, dv, dy2, dvc, dvd, opt(dvs[s0:] if dvs is not None else None), dbeta[s0 * tiles :],
                q0.stride(0), k0.stride(0), *w1s, *w2s, cos.stride(0) if cos is not None else 0,
                sin.stride(0) if sin is not None else 0, *cs, dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
                dv.stride(0), dv.stride(1), dy2.stride(0), dvc.stride(0), dvd.stride(0),
                dvs.stride(0) if dvs is not None else 0, tiles, float(dh) ** 0.5, NORM_EPS,
                **ce, VALUE_SHIFT=meta.value_shift, EXP_TEMP=meta.exp_temp, HAS_CST=cst is not None,
                HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_DVS=dvs is not None, BT=cfg.block_t1,
                DOT_PREC=prec, num_warps=cfg.num_warps1, num_stages=1,
            )  # fmt: skip
        if n_chunks:
            _cca_bwd_conv_kernel[(nbb, n_chunks * h, n)](
                q0, k0, dy2, opt(w1), opt(b1), opt(w2), cu_s, opt(cst_s), dq0, dk0,
                opt(dcs[s0:] if dcs is not None else None), opt(pw2[s0 * n_chunks :] if pw2 is not None else None),
                opt(pb2[s0 * n_chunks :] if pb2 is not None else None),
                opt(pw1[s0 * n_chunks :] if pw1 is not None else None),
                opt(pb1[s0 * n_chunks :] if pb1 is not None else None),
                q0.stride(0), k0.stride(0), dy2.stride(0), *w1s, *w2s, *cs, dq0.stride(0), dk0.stride(0),
                *(dcs.stride() if dcs is not None else (0, 0, 0)), n_chunks, chunk,
                **conv_ce, BB=bb, K1P=next_power_of_2(meta.k1), HAS_CST=cst is not None,
                HAS_DCS=dcs is not None, HAS_B1=b1 is not None, BT=cfg.block_t2, DOT_PREC=prec,
                num_warps=cfg.num_warps2, num_stages=1,
            )  # fmt: skip
    dbeta = dbeta.sum(0)
    exp_t = temperature.detach().float().exp() if meta.exp_temp else None
    dtemp = (dbeta * exp_t if meta.exp_temp else dbeta).to(temperature.dtype)
    dw1 = pw1.sum(0).to(w1.dtype) if pw1 is not None else None
    db1 = pb1.sum(0).to(b1.dtype) if (pb1 is not None and b1 is not None) else None
    dw2 = pw2.sum(0).to(w2.dtype) if pw2 is not None else None
    db2 = pb2.sum(0).to(b2.dtype) if (pb2 is not None and b2 is not None) else None
    dcs = dcs.to(dt) if dcs is not None else None
    dvs = dvs.to(dt) if dvs is not None else None
    return dq0, dk0, dvc, dvd, dw1, db1, dw2, db2, dtemp, dcs, dvs


class CCAPrologueFunction(torch.autograd.Function):
    """Autograd wrapper of the fused prologue (prefill; no final states). ``cos``/``sin`` get no gradient."""

    @staticmethod
    def forward(ctx, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cst, vst, cos, sin, cu, max_seqlen, meta,
                fwd_config, bwd_config):  # fmt: skip
        q0, k0, v_cur, v_del = (last_unit(x) for x in (q0, k0, v_cur, v_del))
        q, k, v, _ = cca_prologue_fwd(meta, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, cu,
                                      max_seqlen, cst, vst, False, config=fwd_config)  # fmt: skip
        ctx.save_for_backward(q0, k0, w1, b1, w2, b2, temperature, cst, cos, sin, cu)
        ctx.meta, ctx.max_seqlen, ctx.bwd_config = meta, max_seqlen, bwd_config
        ctx.vst_shape = tuple(vst.shape) if vst is not None else None
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        q0, k0, w1, b1, w2, b2, temperature, cst, cos, sin, cu = ctx.saved_tensors
        meta = ctx.meta
        need_cst = cst is not None and ctx.needs_input_grad[9]
        grads = cca_prologue_bwd(meta, dq, dk, dv, q0, k0, w1, b1, w2, b2, temperature, cos, sin, cu, ctx.max_seqlen,
                                 cst if meta.pad else None, ctx.vst_shape, need_cst_grad=need_cst,
                                 config=ctx.bwd_config)  # fmt: skip
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
