"""CCA prologue forward in two launches (prefill with two convolutions): conv1 into a scratch, then conv2 as a GEMM.

The one-kernel forward (``prologue_fwd._cca_fwd_kernel``) recomputes conv1 for each conv2 tap in registers and moves
every such tile into the tensor cores' operand layout through shared memory (62 ``bar.sync`` per program; 6.5x its
bandwidth floor at 16k, NOTES.md). Here:

1. ``_conv1_scratch_kernel``, one program per ``(row tile, head, document)``: ``Y1 = conv1(X)`` once per row, in the
   input dtype (the rounding the one-kernel forward applies before its dots), into a scratch ``[T + N (k2 - 1), C]``
   where document ``n`` owns the rows ``bos_n + n (k2 - 1) + [0, k2 - 1 + L_n)``: its ``k2 - 1`` halo rows
   ``Y1[-(k2 - 1) .. -1]`` (computed from the initial conv state, or zeros, plus the bias) then ``Y1[0 .. L_n)``.
   Conv2 tap ``i`` of output row ``t`` thus reads scratch row ``bos_n + n (k2 - 1) + t + i``: a plain shifted tile.
2. ``_conv2_gemm_kernel``, one program per ``(row tile, head, document)``: ``z = sum_i Y1_i @ W2_i^T`` as a
   software-pipelined loop of ``tl.dot``s whose operands are loaded straight from memory (the scratch and
   ``W2B = conv2_weight.permute(2, 1, 0)``, ``[k2, d_h, C]``, so each weight tile is a contiguous ``[K, N]``), then
   the same epilogue as the one-kernel forward: conv2 bias, qk-mean (from ``q0``/``k0``), QK-norm x temperature,
   rotate-half RoPE, and the value head with its shift.

The backward (``prologue_bwd.py``) recomputes ``z`` with the one-kernel code; both round ``Y1`` to the input dtype
before conv2, so they differ by the fp32 summation order only.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from trimformer.ops.cca.prologue_fwd import (
    _MAX_GRID,
    NORM_EPS,
    GemmFwdConfig,
    Meta,
    _bias_mean,
    _chunk_cols,
    _conv_block,
    _head_latents,
    _store_qk,
    _store_v,
    _strides,
)
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting


@functools.lru_cache(maxsize=64)
def default_gemm_config(head_dim: int) -> GemmFwdConfig:
    """Hand-picked configuration (NOTES.md, v4): 64-row tiles, two pipeline stages, bias + qk-mean loaded before
    the GEMM loop (158 instead of 180 registers at d_h 128: 3 programs per SM instead of 2); 16-row tiles and no
    pipelining under the interpreter."""
    if interpreting():
        return GemmFwdConfig(16, 4, 1, 16, 4)
    bd = triton.next_power_of_2(head_dim)
    return GemmFwdConfig(64, 4 if bd <= 128 else 8, 2, max(16, 8192 // bd), 4, early_epilogue=True)


def conv2_k_major(w2: torch.Tensor) -> torch.Tensor:
    """``conv2_weight [C, d_h, k2]`` as ``[k2, d_h, C]`` (contiguous): the GEMM's ``[K, N]`` weight tiles."""
    return w2.permute(2, 1, 0).contiguous()


@triton.jit
def _weight_dots(a, WB, za, zb, zc, b_ok, HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr,
                 NB: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """One reduction chunk of a GEMM prologue forward: ``z += a @ W`` for the three output blocks (rotated halves
    ``za``/``zb`` ``[BT, RB]``, NoPE part ``zc`` ``[BT, NB]``). ``a [BT, BK]``; ``WB`` ``[BK, 1]`` pointers to the
    chunk's weight rows at the head's first output column (rows with ``b_ok`` false read as 0); weights cast to
    ``a``'s dtype."""
    ra = tl.arange(0, RB)
    rn = tl.arange(0, NB)
    ok_h = b_ok[:, None] & (ra < HALF)[None, :]
    if HALF > 0:
        wa = tl.load(WB + ra[None, :], mask=ok_h, other=0.0).to(a.dtype)
        za = tl.dot(a, wa, za, input_precision=DOT_PREC)
        wb = tl.load(WB + HALF + ra[None, :], mask=ok_h, other=0.0).to(a.dtype)
        zb = tl.dot(a, wb, zb, input_precision=DOT_PREC)
    if NOPE > 0:
        wc = tl.load(WB + 2 * HALF + rn[None, :], mask=b_ok[:, None] & (rn < NOPE)[None, :], other=0.0).to(a.dtype)
        zc = tl.dot(a, wc, zc, input_precision=DOT_PREC)
    return za, zb, zc


@triton.jit
def _conv1_scratch_kernel(Q0, K0, W1, B1, CU, CST, Y1S, n0, s_q0, s_k0, s_w1c, s_w1k, s_cn, s_cc, s_cp, s_y,
                          HQ: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                          P: tl.constexpr, HAS_CST: tl.constexpr, HAS_B1: tl.constexpr, BT: tl.constexpr):  # fmt: skip
    """``Y1[s]`` for ``s in [-(k2 - 1), L)`` of document ``n0 + program_id(2)``, head ``program_id(1)``."""
    tile = tl.program_id(0)
    hh = tl.program_id(1)
    n = tl.program_id(2)
    H: tl.constexpr = K2 - 1
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    if tile * BT >= seqlen + H:
        return
    offs = tile * BT - H + tl.arange(0, BT)  # in-document offsets, the halo rows negative
    row_ok = offs < seqlen
    grow = bos + offs
    docs = offs * 0 + n
    X, sx = _head_latents(Q0, s_q0, K0, s_k0, hh, HQ, DH)
    c0 = hh * DH
    cols = tl.arange(0, BD)
    col_ok = cols < DH
    y = _conv_block(X, sx, W1, s_w1c, s_w1k, B1, CST, s_cn, s_cc, s_cp, c0, grow, offs, docs, row_ok, cols, col_ok,
                    K1, P, 1, HAS_CST, HAS_B1)  # fmt: skip
    srow = (bos + (n0 + n) * H + H + offs).to(tl.int64)
    tl.store(Y1S + srow[:, None] * s_y + c0 + cols[None, :], y.to(Y1S.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def _conv2_gemm_kernel(
    Y1S, Q0, K0, VC, VD, W2B, B2, TEMP, COS, SIN, CU, VST, Q, K, V, n0,
    s_y, s_q0, s_k0, s_vc, s_vd, s_w0, s_w1, s_cos, s_sin, s_vsn, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, sqrt_dh, eps,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
    RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, K2: tl.constexpr, QK_MEAN: tl.constexpr,
    VALUE_SHIFT: tl.constexpr, EXP_TEMP: tl.constexpr, HAS_VST: tl.constexpr, HAS_B2: tl.constexpr,
    BT: tl.constexpr, EARLY: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """conv2 (GEMM over the scratch) + epilogue for the rows of one tile of document ``n0 + program_id(2)``."""
    hh = tl.program_id(1)
    n = tl.program_id(2)
    bos = tl.load(CU + n)
    seqlen = tl.load(CU + n + 1) - bos
    if tl.program_id(0) * BT >= seqlen:
        return
    offs = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = offs < seqlen
    grow = bos + offs
    docs = offs * 0 + n
    c0 = hh * DH
    G: tl.constexpr = HQ // HK
    srow = (bos + (n0 + n) * (K2 - 1) + offs).to(tl.int64)  # scratch row of tap 0
    za = tl.zeros([BT, RB], dtype=tl.float32)
    zb = tl.zeros([BT, RB], dtype=tl.float32)
    zc = tl.zeros([BT, NB], dtype=tl.float32)
    if EARLY:
        za, zb, zc = _bias_mean(za, zb, zc, Q0, s_q0, K0, s_k0, B2, hh, grow, row_ok, HQ, G, DH, HALF, RB, NOPE, NB,
                                QK_MEAN, HAS_B2)  # fmt: skip
    for kc in range(0, K2 * BD, BK):
        i = kc // BD
        b = _chunk_cols(kc, BD, BK)
        b_ok = b < DH
        a = tl.load(Y1S + (srow + i)[:, None] * s_y + c0 + b[None, :], mask=row_ok[:, None] & b_ok[None, :],
                    other=0.0)  # fmt: skip
        za, zb, zc = _weight_dots(a, W2B + i * s_w0 + b[:, None] * s_w1 + c0, za, zb, zc, b_ok, HALF, RB, NOPE, NB,
                                  DOT_PREC)  # fmt: skip
    if not EARLY:
        za, zb, zc = _bias_mean(za, zb, zc, Q0, s_q0, K0, s_k0, B2, hh, grow, row_ok, HQ, G, DH, HALF, RB, NOPE, NB,
                                QK_MEAN, HAS_B2)  # fmt: skip
    _store_qk(za, zb, zc, TEMP, COS, SIN, Q, K, s_cos, s_sin, s_qt, s_qh, s_kt, s_kh, hh, grow, row_ok, sqrt_dh,
              eps, HQ, HALF, RB, NOPE, NB, EXP_TEMP)  # fmt: skip
    if hh >= HQ:
        _store_v(VC, VD, VST, V, s_vc, s_vd, s_vsn, s_vt, s_vh, hh - HQ, grow, offs, docs, row_ok, HK, DH, BD,
                 VALUE_SHIFT, HAS_VST)  # fmt: skip


def check_gemm_config(cfg: GemmFwdConfig) -> None:
    """``ValueError`` unless ``cfg.block_k`` is 0 or a power of two."""
    if cfg.block_k and cfg.block_k & (cfg.block_k - 1) or cfg.block_k < 0:
        raise ValueError(f"GemmFwdConfig.block_k must be 0 or a power of two, got {cfg.block_k}")


def max_regs(cfg: GemmFwdConfig) -> dict:
    """Launch option capping the GEMM kernel's registers per thread (``maxnreg``), or none."""
    return {"maxnreg": cfg.max_regs} if cfg.max_regs else {}


def epilogue_args(meta: Meta, q0, k0, v_cur, v_del, cos, sin, vst, q, k, v) -> dict:
    """Keyword arguments of the GEMM kernels' shared epilogue (qk-mean, norm, RoPE, value head): strides and
    constexprs, from the launch's latents, RoPE tables, value state and outputs."""
    ce = meta.constexprs()
    return dict(
        s_q0=q0.stride(0), s_k0=k0.stride(0), s_vc=v_cur.stride(0), s_vd=v_del.stride(0),
        s_cos=cos.stride(0) if cos is not None else 0, s_sin=sin.stride(0) if sin is not None else 0,
        s_vsn=vst.stride(0) if vst is not None else 0, s_qt=q.stride(0), s_qh=q.stride(1), s_kt=k.stride(0),
        s_kh=k.stride(1), s_vt=v.stride(0), s_vh=v.stride(1), sqrt_dh=math.sqrt(meta.dh), eps=NORM_EPS, HQ=meta.hq,
        HK=meta.hk, DH=meta.dh, BD=ce["BD"], HALF=ce["HALF"], RB=ce["RB"], NOPE=ce["NOPE"], NB=ce["NB"],
        QK_MEAN=meta.qk_mean, VALUE_SHIFT=meta.value_shift, EXP_TEMP=meta.exp_temp, HAS_VST=vst is not None,
    )  # fmt: skip


def launch_gemm_fwd(meta: Meta, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, cu, max_seqlen, cst,
                    vst, q, k, v, *, config: GemmFwdConfig | None = None,
                    w2b: torch.Tensor | None = None) -> None:  # fmt: skip
    """Prefill forward with two convolutions (``meta.num_convs == 2``) in two launches, writing ``q [T, h, d_h]``,
    ``k, v [T, h_k, d_h]``; arguments as :func:`trimformer.ops.cca.prologue_fwd.launch_fwd` (last dims unit-stride),
    ``w2b`` an optional precomputed :func:`conv2_k_major` of ``w2`` (``config.folded`` is not read here)."""
    if meta.num_convs != 2:
        raise ValueError(f"the two-kernel forward needs both convolutions, got {meta.num_convs}")
    n_seq = cu.numel() - 1
    rows = q0.shape[0]
    if rows == 0 or max_seqlen == 0:
        return
    cfg = config or default_gemm_config(meta.dh)
    check_gemm_config(cfg)
    ce = meta.constexprs()
    halo = meta.k2 - 1
    c = (meta.hq + meta.hk) * meta.dh
    y1 = torch.empty(rows + n_seq * halo, c, dtype=q0.dtype, device=q0.device)
    w2b = conv2_k_major(w2) if w2b is None else w2b
    dummy = q0
    cs = _strides(cst, 3)
    w1s = w1.stride()
    heads = meta.hq + meta.hk
    conv_tiles = cdiv(max_seqlen + halo, cfg.conv_block_t)
    bk = min(cfg.block_k, ce["BD"]) if cfg.block_k else ce["BK"]
    tiles = cdiv(max_seqlen, cfg.block_t)
    ep = epilogue_args(meta, q0, k0, v_cur, v_del, cos, sin, vst, q, k, v)
    for s0 in range(0, n_seq, _MAX_GRID):
        n = min(_MAX_GRID, n_seq - s0)
        cu_s = cu[s0:] if s0 else cu
        _conv1_scratch_kernel[(conv_tiles, heads, n)](
            q0, k0, w1, b1 if b1 is not None else dummy, cu_s, cst[s0:] if cst is not None else dummy, y1, s0,
            q0.stride(0), k0.stride(0), *w1s, *cs, y1.stride(0), HQ=meta.hq, DH=meta.dh, BD=ce["BD"], K1=meta.k1,
            K2=meta.k2, P=meta.pad, HAS_CST=cst is not None, HAS_B1=b1 is not None, BT=cfg.conv_block_t,
            num_warps=cfg.conv_warps, num_stages=1,
        )  # fmt: skip
        _conv2_gemm_kernel[(tiles, heads, n)](
            y1, q0, k0, v_cur, v_del, w2b, b2 if b2 is not None else dummy, temperature,
            cos if cos is not None else dummy, sin if sin is not None else dummy, cu_s,
            vst[s0:] if vst is not None else dummy, q, k, v, s0, y1.stride(0), s_w0=w2b.stride(0),
            s_w1=w2b.stride(1), **ep, BK=bk, K2=meta.k2, HAS_B2=b2 is not None, BT=cfg.block_t,
            EARLY=cfg.early_epilogue, DOT_PREC=dot_precision(q0.dtype), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, **max_regs(cfg),
        )  # fmt: skip


__all__ = [
    "GemmFwdConfig",
    "check_gemm_config",
    "conv2_k_major",
    "default_gemm_config",
    "epilogue_args",
    "launch_gemm_fwd",
    "max_regs",
]
