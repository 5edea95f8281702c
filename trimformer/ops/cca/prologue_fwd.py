"""Fused CCA / CCGQA prologue forward (Triton): conv1 -> conv2 -> qk-mean -> QK-norm x temperature -> partial RoPE,
and the value shift, in one pass over token tiles; prefill (packed documents) and one-token decode.

Math (``cca-spec.md`` 1.4-1.8, coordinates relative to a document's first token, ``X[o < 0]`` = the initial conv
state, or 0)::

    Y1[s] = b1 + sum_j w1[:, j] * X[s - (k1 - 1) + j]                 s >= -(k2 - 1)   (depthwise)
    Y2[t] = b2 + sum_i W2[:, :, i] @ Y1[t - (k2 - 1) + i]              per head, d_h x d_h (grouped)
    z     = Y2 + mean-term;  out = RoPE(sqrt(d_h) * beta * z / max(|z|, eps))

Both convolutions of one output row read the ``P + 1`` rows ``X[t - P .. t]`` (``P = (k1 - 1) + (k2 - 1)``), so a
tile of ``BT`` rows loads its rows plus a ``P``-row halo; the halo rows before a document's start come from the
state. conv2 is a loop over ``BK``-wide chunks of its reduction axis (tap ``i`` x input channel ``b``): each chunk
computes conv1 for its channels at row ``t - (k2 - 1) + i`` from plain ``[BT, BK]`` loads and feeds one
``tl.dot`` per output-column block, so tiles stay small for any ``k1``, ``k2``, ``d_h``. The head's output columns are
cut into the two rotated halves ``[0, r/2)``, ``[r/2, r)`` and the NoPE part ``[r, d_h)``, so rotate-half RoPE pairs
columns of two tiles.

One program owns one ``(token tile, head, document)``; head ``hh < h`` is a query head, ``hh >= h`` key head
``hh - h`` (which also writes its value head). Decode runs the same kernel with one row per sequence (every row its
own one-token document whose left context is the state) and then advances the states in place. The prefill forward
with both convolutions runs a GEMM forward (:func:`use_gemm_path`): by default the convolutions folded into one GEMM
over the latents (``prologue_folded.py``, :data:`FOLD_CONVS`), else conv1 into a scratch and conv2 as a pipelined GEMM
(``prologue_gemm.py``); this kernel's ``_head_z`` stays the backward's recomputation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.triton_utils import cdiv, dot_precision, dtype_reason, interpreting, next_power_of_2

MAX_HEAD_DIM = 256
MAX_KERNEL = 8
_MAX_GRID = 65535
NORM_EPS = torch.finfo(torch.float32).eps  # the torch path clamps |z| at float32 eps (float64 input: float64 eps)


@dataclass(frozen=True)
class FwdConfig:
    """Launch configuration of the prologue forward: ``block_t`` token rows per program, ``num_warps`` and the
    software-pipelining depth ``num_stages`` of the conv2 chunk loop."""

    block_t: int
    num_warps: int
    num_stages: int = 1


@dataclass(frozen=True)
class GemmFwdConfig:
    """Launch configuration of the GEMM prefill forwards (``prologue_gemm.py``, ``prologue_folded.py``): ``block_t``
    rows, ``num_warps`` and pipelining depth ``num_stages`` of the (conv2) GEMM kernel; ``conv_block_t`` rows and
    ``conv_warps`` of the conv1 kernel; ``block_k`` the GEMM's reduction chunk (0: ``min(64, d_h)``) and
    ``early_epilogue`` (start the accumulators from the conv2 bias + qk-mean, loaded before the GEMM loop);
    ``folded``: run the one-GEMM forward with both convolutions folded (``prologue_folded.py``, no conv1 fields);
    ``max_regs``: ptxas register cap per thread of the GEMM kernel (``maxnreg``; 0: none)."""

    block_t: int
    num_warps: int
    num_stages: int
    conv_block_t: int = 64
    conv_warps: int = 4
    block_k: int = 0
    early_epilogue: bool = False
    folded: bool = False
    max_regs: int = 0


GEMM_MIN_ROWS = 0  # prefill with two convs takes a GEMM forward from this many rows (NOTES.md, v4)
FOLD_CONVS = True  # ... the folded one-GEMM forward (prologue_folded.py); False: conv1 scratch + conv2 GEMM


def use_gemm_path(meta: Meta, rows: int) -> bool:
    """Whether the prefill forward of ``rows`` packed tokens runs the two-kernel path (conv1 scratch + conv2 GEMM)
    rather than the one-kernel forward: only with both convolutions, from :data:`GEMM_MIN_ROWS` rows."""
    return meta.num_convs == 2 and rows >= GEMM_MIN_ROWS


@functools.lru_cache(maxsize=64)
def default_fwd_config(head_dim: int, decode: bool = False) -> FwdConfig:
    """Hand-picked configuration (see NOTES.md); 16 rows under the interpreter and for decode batches."""
    if interpreting() or decode:
        return FwdConfig(16, 4)
    return FwdConfig(64, 4 if head_dim <= 128 else 8)


@triton.jit
def _load_x(X, sx, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, cols, col_ok, shift,
            P: tl.constexpr, HAS_CST: tl.constexpr):  # fmt: skip
    """Pre-conv latents of one head at ``row - shift`` as fp32 ``[BT, W]``.

    ``X`` points at the head's first column; rows before the document (``offs - shift < 0``) come from the conv
    state ``CST[doc, c0 + col, P + offs - shift]`` (or are 0). ``grow/offs/docs/row_ok``: ``[BT]`` global row,
    in-document offset, document, validity; ``cols/col_ok``: ``[W]``; ``shift``: scalar or ``[1, W]``, >= 0.
    """
    o = offs[:, None] - shift  # [BT, W]
    ok = row_ok[:, None] & col_ok[None, :]
    g = (grow[:, None] - shift).to(tl.int64)
    x = tl.load(X + g * sx + cols[None, :], mask=ok & (o >= 0), other=0.0).to(tl.float32)
    if HAS_CST:
        sp = P + o
        st = CST + docs[:, None].to(tl.int64) * s_cn + (c0 + cols[None, :]) * s_cc + sp * s_cp
        x += tl.load(st, mask=ok & (o < 0) & (sp >= 0), other=0.0).to(tl.float32)
    return x


@triton.jit
def _conv_block(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, cols, col_ok,
                K1: tl.constexpr, P: tl.constexpr, NUM_CONVS: tl.constexpr, HAS_CST: tl.constexpr,
                HAS_B1: tl.constexpr):  # fmt: skip
    """Output (fp32 ``[BT, W]``) of the depthwise conv alone (``NUM_CONVS == 1``) or of no conv, for ``cols``."""
    if NUM_CONVS == 1:
        y = tl.zeros([grow.shape[0], cols.shape[0]], dtype=tl.float32)
        for j in tl.static_range(K1):
            wj = tl.load(W1 + (c0 + cols) * s_w1c + j * s_w1k, mask=col_ok, other=0.0).to(tl.float32)
            x = _load_x(X, sx, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, cols, col_ok, K1 - 1 - j,
                        P, HAS_CST)  # fmt: skip
            y += wj[None, :] * x
        if HAS_B1:
            y += tl.load(B1 + c0 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        y = _load_x(X, sx, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, cols, col_ok, 0, P, HAS_CST)
    return y


@triton.jit
def _y1_chunk(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, b, b_ok, i,
              K1: tl.constexpr, K2: tl.constexpr, P: tl.constexpr, HAS_CST: tl.constexpr,
              HAS_B1: tl.constexpr):  # fmt: skip
    """conv1 output at row ``t - (k2 - 1) + i`` (conv2 tap ``i``) for the input channels ``b`` (fp32 ``[BT, BK]``)."""
    y = tl.zeros([grow.shape[0], b.shape[0]], dtype=tl.float32)
    for j in tl.static_range(K1):
        wj = tl.load(W1 + (c0 + b) * s_w1c + j * s_w1k, mask=b_ok, other=0.0).to(tl.float32)
        x = _load_x(X, sx, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, b, b_ok, (K2 - 1 - i) + (K1 - 1 - j),
                    P, HAS_CST)  # fmt: skip
        y += wj[None, :] * x
    if HAS_B1:
        y += tl.load(B1 + c0 + b, mask=b_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _mean_term(Q0, s_q0, K0, s_k0, hh, grow, row_ok, cols, col_ok, HQ: tl.constexpr, G: tl.constexpr,
               DH: tl.constexpr):  # fmt: skip
    """The pre-conv qk-mean added to head ``hh`` (fp32 ``[BT, W]``): ``(q0[h] + k0[h // g]) / 2`` for a query head,
    ``(mean of its group's q0 + k0[j]) / 2`` for key head ``j``."""
    ok = row_ok[:, None] & col_ok[None, :]
    g64 = grow.to(tl.int64)[:, None]
    if hh < HQ:
        m = tl.load(Q0 + g64 * s_q0 + hh * DH + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        m += tl.load(K0 + g64 * s_k0 + (hh // G) * DH + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        j = hh - HQ
        acc = tl.zeros([grow.shape[0], cols.shape[0]], dtype=tl.float32)
        for h in range(j * G, j * G + G):
            acc += tl.load(Q0 + g64 * s_q0 + h * DH + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        m = acc / G + tl.load(K0 + g64 * s_k0 + j * DH + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return 0.5 * m


@triton.jit
def _chunk_cols(kc, BD: tl.constexpr, BK: tl.constexpr):
    """Columns ``kc % BD + [0, BK)`` of the reduction chunk starting at ``kc`` (a multiple of ``BK``), marked
    ``BK``-aligned and contiguous: the loop-carried ``kc % BD`` loses its divisibility, and without the hint the
    tiles these columns address are loaded 2 bytes at a time instead of in 16-byte vectors (or ``cp.async``)."""
    return tl.max_contiguous(tl.multiple_of(kc % BD + tl.arange(0, BK), BK), BK)


@triton.jit
def _head_rows(QT, s_qh, s_qt, KT, s_kh, s_kt, hh, HQ: tl.constexpr):
    """Pointer to the first element of head ``hh`` (query head ``hh < HQ`` of ``QT``, else key head ``hh - HQ`` of
    ``KT``; ``s_qh``/``s_kh`` the head strides) and that tensor's row stride."""
    if hh < HQ:
        X = QT + hh * s_qh
    else:
        X = KT + (hh - HQ) * s_kh
    return X, tl.where(hh < HQ, s_qt, s_kt)


@triton.jit
def _head_latents(Q0, s_q0, K0, s_k0, hh, HQ: tl.constexpr, DH: tl.constexpr):
    """Pointer to the first pre-conv latent of head ``hh`` (query head ``hh < HQ`` in ``Q0``, else key head
    ``hh - HQ`` in ``K0``) and that tensor's row stride."""
    return _head_rows(Q0, DH, s_q0, K0, DH, s_k0, hh, HQ)


@triton.jit
def _bias_mean(za, zb, zc, Q0, s_q0, K0, s_k0, B2, hh, grow, row_ok, HQ: tl.constexpr, G: tl.constexpr,
               DH: tl.constexpr, HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr,
               QK_MEAN: tl.constexpr, HAS_B2: tl.constexpr):  # fmt: skip
    """``(za, zb, zc)`` plus the conv2 bias and the qk-mean of head ``hh`` (column blocks as in ``_head_z``)."""
    c0 = hh * DH
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    ok_h = ra < HALF
    ok_n = rn < NOPE
    if HAS_B2:
        za += tl.load(B2 + c0 + ra, mask=ok_h, other=0.0).to(tl.float32)[None, :]
        zb += tl.load(B2 + c0 + HALF + ra, mask=ok_h, other=0.0).to(tl.float32)[None, :]
        zc += tl.load(B2 + c0 + 2 * HALF + rn, mask=ok_n, other=0.0).to(tl.float32)[None, :]
    if QK_MEAN:
        if HALF > 0:
            za += _mean_term(Q0, s_q0, K0, s_k0, hh, grow, row_ok, ra, ok_h, HQ, G, DH)
            zb += _mean_term(Q0, s_q0, K0, s_k0, hh, grow, row_ok, HALF + ra, ok_h, HQ, G, DH)
        if NOPE > 0:
            zc += _mean_term(Q0, s_q0, K0, s_k0, hh, grow, row_ok, 2 * HALF + rn, ok_n, HQ, G, DH)
    return za, zb, zc


@triton.jit
def _head_z(Q0, s_q0, K0, s_k0, W1, s_w1c, s_w1k, B1, W2T, s_t0, s_t1, B2, CST, s_cn, s_cc, s_cp,
            hh, grow, offs, docs, row_ok,
            HQ: tl.constexpr, G: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
            HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, K1: tl.constexpr,
            K2: tl.constexpr, P: tl.constexpr, NUM_CONVS: tl.constexpr, QK_MEAN: tl.constexpr,
            HAS_CST: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """``z`` (before the norm) of head ``hh`` for the tile's rows, as three fp32 column blocks: rotated first half
    ``[BT, RB]``, rotated second half ``[BT, RB]`` and NoPE part ``[BT, NB]`` (masked columns are 0).

    conv2 is a loop over ``BK``-wide chunks of its reduction axis (tap ``i``, input channel ``b``): each chunk
    computes conv1 for those channels at row ``t - (k2 - 1) + i`` and adds ``Y1 @ W2[:, b, i]^T`` to every
    output block (``W2T = conv2_weight.permute(2, 0, 1)``, ``[k2, C, d_h]``, so weight rows load contiguously).
    """
    X, sx = _head_latents(Q0, s_q0, K0, s_k0, hh, HQ, DH)
    c0 = hh * DH
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    ok_h = ra < HALF
    ok_n = rn < NOPE
    DT = Q0.dtype.element_ty
    za = tl.zeros([grow.shape[0], RB], dtype=tl.float32)
    zb = tl.zeros([grow.shape[0], RB], dtype=tl.float32)
    zc = tl.zeros([grow.shape[0], NB], dtype=tl.float32)
    if NUM_CONVS == 2:
        for kc in range(0, K2 * BD, BK):
            i = kc // BD
            b = _chunk_cols(kc, BD, BK)
            b_ok = b < DH
            y1 = _y1_chunk(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, b, b_ok,
                           i, K1, K2, P, HAS_CST, HAS_B1).to(DT)  # fmt: skip
            WT = W2T + i * s_t0 + c0 * s_t1 + b[None, :]
            if HALF > 0:
                wa = tl.load(WT + ra[:, None] * s_t1, mask=ok_h[:, None] & b_ok[None, :], other=0.0).to(DT)
                za = tl.dot(y1, tl.trans(wa), za, input_precision=DOT_PREC)
                wb = tl.load(WT + (HALF + ra)[:, None] * s_t1, mask=ok_h[:, None] & b_ok[None, :], other=0.0).to(DT)
                zb = tl.dot(y1, tl.trans(wb), zb, input_precision=DOT_PREC)
            if NOPE > 0:
                wc = tl.load(WT + (2 * HALF + rn)[:, None] * s_t1, mask=ok_n[:, None] & b_ok[None, :], other=0.0)
                zc = tl.dot(y1, tl.trans(wc.to(DT)), zc, input_precision=DOT_PREC)
    else:
        if HALF > 0:
            za = _conv_block(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, ra,
                             ok_h, K1, P, NUM_CONVS, HAS_CST, HAS_B1)  # fmt: skip
            zb = _conv_block(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok,
                             HALF + ra, ok_h, K1, P, NUM_CONVS, HAS_CST, HAS_B1)  # fmt: skip
        if NOPE > 0:
            zc = _conv_block(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok,
                             2 * HALF + rn, ok_n, K1, P, NUM_CONVS, HAS_CST, HAS_B1)  # fmt: skip
    # the conv2 bias exists only with conv2 (NUM_CONVS == 2)
    return _bias_mean(za, zb, zc, Q0, s_q0, K0, s_k0, B2, hh, grow, row_ok, HQ, G, DH, HALF, RB, NOPE, NB, QK_MEAN,
                      HAS_B2 and NUM_CONVS == 2)  # fmt: skip


@triton.jit
def _head_scale(TEMP, hh, sqrt_dh, HQ: tl.constexpr, EXP_TEMP: tl.constexpr):
    """``sqrt(d_h)`` for a query head, ``sqrt(d_h) * beta_j`` for key head ``j`` (``beta = T`` or ``exp(T)``)."""
    beta = tl.load(TEMP + tl.maximum(hh - HQ, 0)).to(tl.float32)
    if EXP_TEMP:
        beta = tl.exp(beta)
    return tl.where(hh < HQ, sqrt_dh, sqrt_dh * beta)


@triton.jit
def _store_qk(za, zb, zc, TEMP, COS, SIN, Q, K, s_cos, s_sin, s_qt, s_qh, s_kt, s_kh, hh, grow, row_ok, sqrt_dh, eps,
              HQ: tl.constexpr, HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr,
              EXP_TEMP: tl.constexpr):  # fmt: skip
    """QK-norm x temperature and rotate-half RoPE of ``z = (za, zb, zc)`` (see :func:`_head_z`), stored to head
    ``hh`` of ``Q`` (query head) or ``K`` (key head ``hh - HQ``) for the rows ``grow``."""
    sumsq = tl.sum(za * za, 1) + tl.sum(zb * zb, 1) + tl.sum(zc * zc, 1)
    f = (_head_scale(TEMP, hh, sqrt_dh, HQ, EXP_TEMP) / tl.maximum(tl.sqrt(sumsq), eps))[:, None]
    g64 = grow.to(tl.int64)[:, None]
    O, so = _head_rows(Q, s_qh, s_qt, K, s_kh, s_kt, hh, HQ)
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    if HALF > 0:
        ok_r = row_ok[:, None] & (ra < HALF)[None, :]
        cs = tl.load(COS + g64 * s_cos + ra[None, :], mask=ok_r, other=0.0).to(tl.float32)
        sn = tl.load(SIN + g64 * s_sin + ra[None, :], mask=ok_r, other=0.0).to(tl.float32)
        tl.store(O + g64 * so + ra[None, :], ((za * cs - zb * sn) * f).to(O.dtype.element_ty), mask=ok_r)
        tl.store(O + g64 * so + HALF + ra[None, :], ((zb * cs + za * sn) * f).to(O.dtype.element_ty), mask=ok_r)
    if NOPE > 0:
        ok_n = row_ok[:, None] & (rn < NOPE)[None, :]
        tl.store(O + g64 * so + 2 * HALF + rn[None, :], (zc * f).to(O.dtype.element_ty), mask=ok_n)


@triton.jit
def _store_v(VC, VD, VST, V, s_vc, s_vd, s_vsn, s_vt, s_vh, j, grow, offs, docs, row_ok, HK: tl.constexpr,
             DH: tl.constexpr, BD: tl.constexpr, VALUE_SHIFT: tl.constexpr, HAS_VST: tl.constexpr):  # fmt: skip
    """Value head ``j`` for the rows ``grow``: flat column ``f < Ck/2`` from ``v_cur``, the rest from ``v_del`` of
    the previous token (the value state before a document's first token) or, without the shift, of this token."""
    VHALF: tl.constexpr = HK * DH // 2
    rd = tl.arange(0, BD)
    g64 = grow.to(tl.int64)[:, None]
    fc = j * DH + rd
    ok_v = row_ok[:, None] & (rd < DH)[None, :]
    cur = (fc < VHALF)[None, :]
    v = tl.load(VC + g64 * s_vc + fc[None, :], mask=ok_v & cur, other=0.0)
    fd = (fc - VHALF)[None, :]
    if VALUE_SHIFT:
        prev = offs[:, None] >= 1
        v += tl.load(VD + (g64 - 1) * s_vd + fd, mask=ok_v & (~cur) & prev, other=0.0)
        if HAS_VST:
            v += tl.load(VST + docs.to(tl.int64)[:, None] * s_vsn + fd, mask=ok_v & (~cur) & (~prev), other=0.0)
    else:
        v += tl.load(VD + g64 * s_vd + fd, mask=ok_v & (~cur), other=0.0)
    tl.store(V + g64 * s_vt + j * s_vh + rd[None, :], v, mask=ok_v)


@triton.jit
def _cca_fwd_kernel(
    Q0, K0, VC, VD, W1, B1, W2T, B2, TEMP, COS, SIN, CU, CST, VST, Q, K, V,
    s_q0, s_k0, s_vc, s_vd, s_w1c, s_w1k, s_t0, s_t1, s_cos, s_sin, s_cn, s_cc, s_cp, s_vsn,
    s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, n_rows, sqrt_dh, eps,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
    RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, P: tl.constexpr,
    PP: tl.constexpr, NUM_CONVS: tl.constexpr, QK_MEAN: tl.constexpr, VALUE_SHIFT: tl.constexpr,
    EXP_TEMP: tl.constexpr, HAS_CST: tl.constexpr, HAS_VST: tl.constexpr, HAS_B1: tl.constexpr,
    HAS_B2: tl.constexpr, DECODE: tl.constexpr, BT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    hh = tl.program_id(1)
    if DECODE:  # one row per sequence; every row is a one-token document continuing its state
        grow = tl.program_id(0) * BT + tl.arange(0, BT)
        row_ok = grow < n_rows
        offs = grow * 0
        docs = grow
    else:
        n = tl.program_id(2)
        bos = tl.load(CU + n)
        seqlen = tl.load(CU + n + 1) - bos
        offs = tl.program_id(0) * BT + tl.arange(0, BT)
        if tl.program_id(0) * BT >= seqlen:
            return
        row_ok = offs < seqlen
        grow = bos + offs
        docs = offs * 0 + n
    G: tl.constexpr = HQ // HK
    za, zb, zc = _head_z(Q0, s_q0, K0, s_k0, W1, s_w1c, s_w1k, B1, W2T, s_t0, s_t1, B2, CST, s_cn, s_cc, s_cp,
                         hh, grow, offs, docs, row_ok, HQ, G, DH, BD, BK, HALF, RB, NOPE, NB, K1, K2, P, NUM_CONVS,
                         QK_MEAN, HAS_CST, HAS_B1, HAS_B2, DOT_PREC)  # fmt: skip
    _store_qk(za, zb, zc, TEMP, COS, SIN, Q, K, s_cos, s_sin, s_qt, s_qh, s_kt, s_kh, hh, grow, row_ok, sqrt_dh,
              eps, HQ, HALF, RB, NOPE, NB, EXP_TEMP)  # fmt: skip
    if DECODE:
        if P > 0:  # conv state <- the last P rows of the window [state ; x_t], read before any program writes
            X, sx = _head_latents(Q0, s_q0, K0, s_k0, hh, HQ, DH)
            c0 = hh * DH
            WP: tl.constexpr = PP * BD
            w = tl.arange(0, WP)
            w_p = w // BD
            w_d = w % BD
            w_ok = (w_p < P) & (w_d < DH)
            win = _load_x(X, sx, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, w_d, w_ok,
                          (P - 1 - w_p)[None, :], P, HAS_CST)  # fmt: skip
            tl.debug_barrier()
            st = CST + docs.to(tl.int64)[:, None] * s_cn + (c0 + w_d[None, :]) * s_cc + w_p[None, :] * s_cp
            tl.store(st, win.to(CST.dtype.element_ty), mask=row_ok[:, None] & w_ok[None, :])
    if hh >= HQ:
        _store_v(VC, VD, VST, V, s_vc, s_vd, s_vsn, s_vt, s_vh, hh - HQ, grow, offs, docs, row_ok, HK, DH, BD,
                 VALUE_SHIFT, HAS_VST)  # fmt: skip
        if DECODE:  # value state <- this token's delayed projection (the old one was read by _store_v)
            VHALF: tl.constexpr = HK * DH // 2
            rd = tl.arange(0, BD)
            fd = ((hh - HQ) * DH + rd - VHALF)[None, :]
            ok_d = row_ok[:, None] & (rd < DH)[None, :] & (fd >= 0)
            vnew = tl.load(VD + grow.to(tl.int64)[:, None] * s_vd + fd, mask=ok_d, other=0.0)
            tl.debug_barrier()
            tl.store(VST + docs.to(tl.int64)[:, None] * s_vsn + fd, vnew, mask=ok_d)


@triton.jit
def _final_state_kernel(Q0, K0, VD, CU, CST, VST, FCS, FVS, s_q0, s_k0, s_vd, s_cn, s_cc, s_cp, s_vsn,
                        s_fn, s_fc, s_fp, s_fvn, CQ: tl.constexpr, C: tl.constexpr, VHALF: tl.constexpr,
                        P: tl.constexpr, HAS_CST: tl.constexpr, HAS_VST: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """States after each document: the last ``P`` pre-conv rows (from the state when the document is shorter) and
    the delayed value of its last token (the initial value state for an empty document)."""
    n = tl.program_id(1)
    ch = tl.program_id(0) * BC + tl.arange(0, BC)
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    c_ok = ch < C
    is_q = ch < CQ
    for p in tl.static_range(P):
        o = ch * 0 + (seqlen - P + p)  # [BC] (vector: the interpreter rejects scalar masks)
        row = (bos + o).to(tl.int64)
        inside = o >= 0
        x = tl.load(Q0 + row * s_q0 + ch, mask=c_ok & is_q & inside, other=0.0)
        x += tl.load(K0 + row * s_k0 + (ch - CQ), mask=c_ok & (~is_q) & inside, other=0.0)
        if HAS_CST:
            x += tl.load(CST + n * s_cn + ch * s_cc + (P + o) * s_cp, mask=c_ok & (o < 0), other=0.0)
        tl.store(FCS + n * s_fn + ch * s_fc + p * s_fp, x, mask=c_ok)
    v_ok = ch < VHALF
    last = (bos + seqlen - 1).to(tl.int64)
    nonempty = (ch * 0 + seqlen) > 0
    v = tl.load(VD + last * s_vd + ch, mask=v_ok & nonempty, other=0.0)
    if HAS_VST:
        v += tl.load(VST + n * s_vsn + ch, mask=v_ok & (~nonempty), other=0.0)
    tl.store(FVS + n * s_fvn + ch, v, mask=v_ok)


@dataclass(frozen=True)
class Meta:
    """Static shape facts and switches of one prologue call (everything the kernels take as constexpr)."""

    hq: int
    hk: int
    dh: int
    rotary_dim: int
    k1: int
    k2: int
    num_convs: int
    qk_mean: bool
    value_shift: bool
    exp_temp: bool

    @property
    def pad(self) -> int:
        return (self.k1 - 1) + (self.k2 - 1)

    def constexprs(self) -> dict:
        half, nope = self.rotary_dim // 2, self.dh - self.rotary_dim
        bd = max(16, next_power_of_2(self.dh))
        return dict(
            HQ=self.hq, HK=self.hk, DH=self.dh, BD=bd, BK=min(bd, 64), HALF=half, RB=max(16, next_power_of_2(half)),
            NOPE=nope, NB=max(16, next_power_of_2(nope)), K1=self.k1, K2=self.k2, P=self.pad,
            NUM_CONVS=self.num_convs, QK_MEAN=self.qk_mean,
        )  # fmt: skip


def make_meta(q0, w1, w2, cos, *, num_heads, num_kv_heads, qk_mean, value_shift, temperature_mode) -> Meta:
    """:class:`Meta` from the (validated) arguments of :func:`trimformer.ops.cca.cca_prologue`."""
    num_convs = 0 if w1 is None else (1 if w2 is None else 2)
    return Meta(
        hq=num_heads, hk=num_kv_heads, dh=q0.shape[-1] // num_heads, rotary_dim=0 if cos is None else 2 * cos.shape[-1],
        k1=w1.shape[-1] if w1 is not None else 1, k2=w2.shape[-1] if w2 is not None else 1, num_convs=num_convs,
        qk_mean=bool(qk_mean), value_shift=bool(value_shift), exp_temp=temperature_mode == "exp",
    )  # fmt: skip


def unsupported_reason(q0: torch.Tensor, dh: int, k1: int, k2: int) -> str | None:
    """Why the Triton prologue kernels cannot take this input, or ``None`` (shapes validated by ``api.py``)."""
    reason = dtype_reason(q0)
    if reason is not None:
        return reason
    if dh > MAX_HEAD_DIM:
        return f"head dim {dh} (supported: up to {MAX_HEAD_DIM})"
    if max(k1, k2) > MAX_KERNEL:
        return f"conv kernel sizes {k1}, {k2} (supported: up to {MAX_KERNEL})"
    return None


def last_unit(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with unit stride on its last dim (a copy only when needed)."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()[:n]) if t is not None else (0,) * n


def conv2_transposed(w2: torch.Tensor | None) -> torch.Tensor | None:
    """``conv2_weight [C, d_h, k2]`` as ``[k2, C, d_h]`` (contiguous): the kernels load weight rows contiguously."""
    return None if w2 is None else w2.permute(2, 0, 1).contiguous()


def launch_fwd(meta: Meta, q0, k0, v_cur, v_del, w1, b1, w2t, b2, temperature, cos, sin, cu, max_seqlen, cst, vst,
               q, k, v, *, decode: bool, config: FwdConfig | None = None) -> None:  # fmt: skip
    """Launch the forward kernel writing ``q [T, h, d_h]``, ``k, v [T, h_k, d_h]`` (decode: also the states).

    ``w2t`` is :func:`conv2_transposed` of ``conv2_weight``.
    """
    rows = q0.shape[0]
    if rows == 0:
        return
    cfg = config or default_fwd_config(meta.dh, decode)
    dummy = q0
    w1s = w1.stride() if w1 is not None else (0, 0)
    kw = dict(
        s_q0=q0.stride(0), s_k0=k0.stride(0), s_vc=v_cur.stride(0), s_vd=v_del.stride(0), s_w1c=w1s[0],
        s_w1k=w1s[1], s_t0=w2t.stride(0) if w2t is not None else 0, s_t1=w2t.stride(1) if w2t is not None else 0,
        s_cos=cos.stride(0) if cos is not None else 0, s_sin=sin.stride(0) if sin is not None else 0,
        s_cn=_strides(cst, 3)[0], s_cc=_strides(cst, 3)[1], s_cp=_strides(cst, 3)[2], s_vsn=_strides(vst, 1)[0],
        s_qt=q.stride(0), s_qh=q.stride(1), s_kt=k.stride(0), s_kh=k.stride(1), s_vt=v.stride(0), s_vh=v.stride(1),
        n_rows=rows, sqrt_dh=math.sqrt(meta.dh), eps=NORM_EPS,
        **meta.constexprs(), PP=next_power_of_2(max(meta.pad, 1)), VALUE_SHIFT=meta.value_shift,
        EXP_TEMP=meta.exp_temp, HAS_CST=cst is not None, HAS_VST=vst is not None, HAS_B1=b1 is not None,
        HAS_B2=b2 is not None, DECODE=decode, BT=cfg.block_t, DOT_PREC=dot_precision(q0.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    ptrs = [q0, k0, v_cur, v_del, w1 if w1 is not None else dummy, b1 if b1 is not None else dummy,
            w2t if w2t is not None else dummy, b2 if b2 is not None else dummy, temperature,
            cos if cos is not None else dummy, sin if sin is not None else dummy]  # fmt: skip
    heads = meta.hq + meta.hk
    if decode:
        _cca_fwd_kernel[(cdiv(rows, cfg.block_t), heads, 1)](
            *ptrs, dummy, cst if cst is not None else dummy, vst if vst is not None else dummy, q, k, v, **kw
        )
        return
    n_seq = cu.numel() - 1
    tiles = cdiv(max_seqlen, cfg.block_t)
    if tiles == 0:
        return
    for s0 in range(0, n_seq, _MAX_GRID):
        n = min(_MAX_GRID, n_seq - s0)
        cst_s = (cst[s0:] if s0 else cst) if cst is not None else dummy
        vst_s = (vst[s0:] if s0 else vst) if vst is not None else dummy
        _cca_fwd_kernel[(tiles, heads, n)](*ptrs, cu[s0:] if s0 else cu, cst_s, vst_s, q, k, v, **kw)


def final_states(meta: Meta, q0, k0, v_del, cu, cst, vst) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv_state [N, C, P], value_state [N, Ck/2])`` after each document (see :func:`cca_prologue`)."""
    n_seq = cu.numel() - 1
    c = q0.shape[-1] + k0.shape[-1]
    vhalf = k0.shape[-1] // 2
    fcs = torch.empty(n_seq, c, meta.pad, dtype=q0.dtype, device=q0.device)
    fvs = torch.empty(n_seq, vhalf, dtype=q0.dtype, device=q0.device)
    if n_seq == 0:
        return fcs, fvs
    bc = 128 if not interpreting() else max(16, next_power_of_2(c))
    cs, vs = _strides(cst, 3), _strides(vst, 1)
    fs = fcs.stride() if meta.pad else (0, 0, 0)
    for s0 in range(0, n_seq, _MAX_GRID):
        n = min(_MAX_GRID, n_seq - s0)
        _final_state_kernel[(cdiv(c, bc), n)](
            q0, k0, v_del, cu[s0:] if s0 else cu, cst[s0:] if cst is not None else q0,
            vst[s0:] if vst is not None else q0, fcs[s0:], fvs[s0:], q0.stride(0), k0.stride(0), v_del.stride(0),
            *cs, *vs, *fs, fvs.stride(0), CQ=q0.shape[-1], C=c, VHALF=vhalf, P=meta.pad, HAS_CST=cst is not None,
            HAS_VST=vst is not None, BC=bc,
        )  # fmt: skip
    return fcs, fvs


def cca_prologue_fwd(meta: Meta, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, cu_seqlens,
                     max_seqlen, initial_conv_state, initial_value_state, return_final_state,
                     config: FwdConfig | GemmFwdConfig | None = None, w2t: torch.Tensor | None = None,
                     folded: tuple[torch.Tensor, torch.Tensor | None] | None = None):  # fmt: skip
    """Prefill forward (arguments as :func:`trimformer.ops.cca.cca_prologue`, validated there; ``w2t``: a
    precomputed :func:`conv2_transposed` of ``w2``; ``folded``: a precomputed
    ``prologue_folded.launch_fold(w1, b1, w2, b2, q0.dtype)`` for the folded forward, unused by the other paths).
    ``config``: a :class:`FwdConfig` runs the one-kernel forward, a :class:`GemmFwdConfig` the folded
    (``folded=True``) or two-kernel GEMM forward (two convolutions only), ``None`` picks by :func:`use_gemm_path` and
    :data:`FOLD_CONVS`.

    Returns:
        ``(q [T, h, d_h], k [T, h_k, d_h], v [T, h_k, d_h], final | None)`` in the dtype of ``q0``.
    """
    q0, k0, v_cur, v_del, cos, sin = (last_unit(t) for t in (q0, k0, v_cur, v_del, cos, sin))
    t = q0.shape[0]
    q = torch.empty(t, meta.hq, meta.dh, dtype=q0.dtype, device=q0.device)
    k = torch.empty(t, meta.hk, meta.dh, dtype=q0.dtype, device=q0.device)
    v = torch.empty(t, meta.hk, meta.dh, dtype=q0.dtype, device=q0.device)
    cst = initial_conv_state if meta.pad else None
    if meta.num_convs == 2 and (isinstance(config, GemmFwdConfig) or (config is None and use_gemm_path(meta, t))):
        from trimformer.ops.cca import prologue_folded, prologue_gemm

        fold = config.folded if config is not None else FOLD_CONVS
        args = (meta, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, cu_seqlens, max_seqlen, cst,
                initial_value_state, q, k, v)  # fmt: skip
        if fold:
            prologue_folded.launch_folded_fwd(*args, config=config, folded=folded)
        else:
            prologue_gemm.launch_gemm_fwd(*args, config=config)
    else:
        w2t = conv2_transposed(w2) if w2t is None else w2t
        launch_fwd(meta, q0, k0, v_cur, v_del, w1, b1, w2t, b2, temperature, cos, sin, cu_seqlens, max_seqlen, cst,
                   initial_value_state, q, k, v, decode=False, config=config)  # fmt: skip
    final = final_states(meta, q0, k0, v_del, cu_seqlens, cst, initial_value_state) if return_final_state else None
    return q, k, v, final


def cca_decode_prologue_fwd(meta: Meta, q0, k0, v_cur, v_del, conv_state, value_state, w1, b1, w2, b2, temperature,
                            cos, sin, config: FwdConfig | None = None):  # fmt: skip
    """One-token decode (arguments as :func:`trimformer.ops.cca.cca_decode_prologue`): returns ``(q, k, v)`` and
    advances ``conv_state`` and ``value_state`` in place; static shapes, no host reads (graph-capturable)."""
    q0, k0, v_cur, v_del, cos, sin = (last_unit(t) for t in (q0, k0, v_cur, v_del, cos, sin))
    b = q0.shape[0]
    q = torch.empty(b, meta.hq, meta.dh, dtype=q0.dtype, device=q0.device)
    k = torch.empty(b, meta.hk, meta.dh, dtype=q0.dtype, device=q0.device)
    v = torch.empty(b, meta.hk, meta.dh, dtype=q0.dtype, device=q0.device)
    launch_fwd(meta, q0, k0, v_cur, v_del, w1, b1, conv2_transposed(w2), b2, temperature, cos, sin, None, 1,
               conv_state if meta.pad else None, value_state, q, k, v, decode=True, config=config)  # fmt: skip
    return q, k, v


__all__ = [
    "FwdConfig",
    "GemmFwdConfig",
    "Meta",
    "cca_decode_prologue_fwd",
    "cca_prologue_fwd",
    "conv2_transposed",
    "make_meta",
    "unsupported_reason",
    "use_gemm_path",
]
