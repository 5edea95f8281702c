"""CCA prologue forward with both convolutions folded into ONE GEMM over the latents (prefill, two convolutions).

Both convolutions are linear and share one left pad of ``P = (k1 - 1) + (k2 - 1)`` rows (``naive.py``), so with
``X[o]`` the pre-conv row at in-document offset ``o`` (``o < 0``: the initial conv state, or 0) and ``c`` running over
the input channels of output channel ``o_ch``'s head (``F.conv1d`` is a cross-correlation)::

    z[t, o_ch] = bf[o_ch] + sum_{s = 0..P} sum_c Mf[s, c, o_ch] * X[t + s - P, c]
    Mf[s, c, o_ch] = sum_{i + j = s} W2[o_ch, c, i] * w1[c, j]
    bf[o_ch]       = b2[o_ch] + sum_i sum_c W2[o_ch, c, i] * b1[c]

exactly (no approximation beyond rounding). ``Mf`` is a grouped conv1d kernel of size ``P + 1``: the two-kernel
forward (``prologue_gemm.py``: conv1 into a scratch, conv2 as a GEMM over it) becomes one kernel whose A tiles are
read straight from ``q0``/``k0`` at ``P + 1`` row taps, with no conv1 pass and no scratch round trip; the epilogue
(qk-mean, QK-norm x temperature, RoPE, value head and shift) is the shared one of ``prologue_fwd.py``.

Precision: ``Mf`` is computed in fp32 from the (16-bit) weights and rounded to the input dtype once; ``bf`` stays
fp32. The two-kernel forward instead rounds ``Y1 = conv1(X)`` to the input dtype before conv2. Emulated in fp64 on
the GPU test shapes (d_h 64-256, CCA and CCGQA, bf16 and fp16), the folded forward's error against the fp64
reference is 3-5% lower in rms than the two-kernel one's and within +-12% in max (both ~0.5x plain PyTorch's max);
a hi/lo split of ``Mf`` (two dots per chunk) lowers the rms by another ~9% only, so the weights are rounded once.

Per call the folding is one small launch (``_fold_kernel``, ``[P + 1, d_h, C]`` weights, like the two-kernel
forward's ``conv2_k_major`` copy); :func:`fold_conv_weights` is the same fold in PyTorch, for callers that cache it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trimformer.ops.cca.prologue_fwd import (
    _MAX_GRID,
    GemmFwdConfig,
    Meta,
    _bias_mean,
    _chunk_cols,
    _head_latents,
    _store_qk,
    _store_v,
    _strides,
)
from trimformer.ops.cca.prologue_gemm import _weight_dots, check_gemm_config, epilogue_args, max_regs
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting


def fold_conv_weights(
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor | None,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor | None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both convolutions as one grouped convolution of size ``P + 1`` (see the module docstring), in PyTorch.

    Args:
        conv1_weight: ``[C, k1]`` depthwise conv1 weight; ``conv1_bias``: ``[C]`` or ``None``.
        conv2_weight: ``[C, d_h, k2]`` grouped conv2 weight (groups of ``d_h`` channels); ``conv2_bias``: ``[C]`` or
            ``None``.
        dtype: dtype of the folded weight (the dots' input dtype); default ``conv2_weight.dtype``.

    Returns:
        ``(mf, bf)``: ``mf [P + 1, d_h, C]`` contiguous in ``dtype``, computed in fp32 (fp64 for fp64 weights) and
        rounded once, ``mf[s, c, o] = sum_{i + j = s} W2[o, c, i] w1[head(o) d_h + c, j]``; ``bf [C]`` fp32 (fp64)
        ``b2 + sum_{i, c} W2[o, c, i] b1[head(o) d_h + c]``, or ``None`` when both biases are ``None``.
    """
    c, dh, k2 = conv2_weight.shape
    k1 = conv1_weight.shape[-1]
    if c % dh or tuple(conv1_weight.shape) != (c, k1):
        raise ValueError(f"conv1_weight [{tuple(conv1_weight.shape)}] and conv2_weight [{c}, {dh}, {k2}] do not fit "
                         "C channels in groups of d_h")  # fmt: skip
    wide = torch.float64 if conv2_weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        head0 = torch.arange(c, device=conv2_weight.device) // dh * dh  # first input channel of o's head
        cin = head0[:, None] + torch.arange(dh, device=conv2_weight.device)  # [C, d_h] input channel of (o, c)
        w2 = conv2_weight.to(wide)
        w1g = conv1_weight.to(wide)[cin]  # [C, d_h, k1]
        mf = w2.new_zeros(k1 + k2 - 1, dh, c)
        for i in range(k2):
            for j in range(k1):
                mf[i + j] += (w2[:, :, i] * w1g[:, :, j]).t()
        bf = None
        if conv1_bias is not None or conv2_bias is not None:
            bf = conv2_bias.to(wide).clone() if conv2_bias is not None else w2.new_zeros(c)
            if conv1_bias is not None:
                bf += torch.einsum("oci,oc->o", w2, conv1_bias.to(wide)[cin])
    return mf.to(dtype or conv2_weight.dtype).contiguous(), bf


@triton.jit
def _fold_kernel(W1, B1, W2, B2, MF, BF, s_w1c, s_w1k, s_w2o, s_w2c, s_w2i, s_m0, s_m1, C,
                 DH: tl.constexpr, BD: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, HAS_B1: tl.constexpr,
                 HAS_B2: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr):  # fmt: skip
    """``MF[:, c, o]`` for the input channels ``c`` of block ``program_id(1)`` and output channels ``o`` of block
    ``program_id(0)``; the extra block ``program_id(1) == cdiv(DH, BC)`` writes the folded bias ``BF[o]``.

    No load depends on another (the bias block reads whole ``d_h`` rows at once instead of looping over channel
    blocks), so a program waits for about one round of loads; tiles are ``[BO, BC]`` with ``c`` fastest (conv2 rows
    are ``o``-major)."""
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    o_ok = o < C
    head0 = o // DH * DH  # first input channel of o's head
    if tl.program_id(1) * BC < DH:
        cc = tl.program_id(1) * BC + tl.arange(0, BC)
        ok = o_ok[:, None] & (cc < DH)[None, :]
        w2p = W2 + o[:, None] * s_w2o + cc[None, :] * s_w2c
        w1p = W1 + (head0[:, None] + cc[None, :]) * s_w1c
        for s in tl.static_range(K1 + K2 - 1):
            m = tl.zeros([BO, BC], dtype=tl.float32)
            for i in tl.static_range(K2):
                if s - i >= 0:
                    if s - i < K1:
                        w2 = tl.load(w2p + i * s_w2i, mask=ok, other=0.0).to(tl.float32)
                        m += w2 * tl.load(w1p + (s - i) * s_w1k, mask=ok, other=0.0).to(tl.float32)
            tl.store(MF + s * s_m0 + cc[None, :] * s_m1 + o[:, None], m.to(MF.dtype.element_ty), mask=ok)
    else:
        acc = tl.zeros([BO], dtype=tl.float32)
        if HAS_B2:
            acc += tl.load(B2 + o, mask=o_ok, other=0.0).to(tl.float32)
        if HAS_B1:
            cd = tl.arange(0, BD)
            row_ok = o_ok[:, None] & (cd < DH)[None, :]
            b1 = tl.load(B1 + head0[:, None] + cd[None, :], mask=row_ok, other=0.0).to(tl.float32)
            w2row = W2 + o[:, None] * s_w2o + cd[None, :] * s_w2c
            w2sum = tl.load(w2row, mask=row_ok, other=0.0).to(tl.float32)
            for i in tl.static_range(1, K2):
                w2sum += tl.load(w2row + i * s_w2i, mask=row_ok, other=0.0).to(tl.float32)
            acc += tl.sum(w2sum * b1, 1)
        tl.store(BF + o, acc, mask=o_ok)


def launch_fold(w1, b1, w2, b2, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`fold_conv_weights` in one Triton launch (fp32 math): ``(mf [P + 1, d_h, C] in dtype, bf [C] fp32 or
    None)``; ``w1 [C, k1]``, ``w2 [C, d_h, k2]`` and the biases ``[C]`` on the device, in any float dtype."""
    c, dh, k2 = w2.shape
    k1 = w1.shape[-1]
    mf = torch.empty(k1 + k2 - 1, dh, c, dtype=dtype, device=w2.device)
    has_bias = b1 is not None or b2 is not None
    bf = torch.empty(c, dtype=torch.float32, device=w2.device) if has_bias else None
    bd = triton.next_power_of_2(dh)
    bc = min(32, bd)
    bo = 16 if interpreting() else 32
    _fold_kernel[(cdiv(c, bo), cdiv(dh, bc) + has_bias)](
        w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2, mf, bf if bf is not None else mf,
        *w1.stride(), *w2.stride(), mf.stride(0), mf.stride(1), c, DH=dh, BD=bd, K1=k1, K2=k2,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, BC=bc, BO=bo, num_warps=4,
    )  # fmt: skip
    return mf, bf


#: from this many rows the folded forward of a grouped layer (``G > 1``) takes 128-row tiles (NOTES.md, v7)
WIDE_TILE_ROWS = 16384


def default_folded_config(head_dim: int, rows: int = 0, group: int = 1) -> GemmFwdConfig:
    """Launch configuration of the folded forward for ``rows`` packed tokens and ``group = h / h_k`` query heads per
    kv head (NOTES.md, v7; H100, d_h 128): 128-row tiles, 4 warps, 3 stages, uncapped (two programs per SM) without
    grouping or from :data:`WIDE_TILE_ROWS` rows (-5% to -30% against 64 rows), else 64 rows, 4 warps, 2 stages, 168
    registers (three programs per SM; the grouped layer's kv programs carry the ``G``-head qk-mean, and 128 rows
    were 7% slower at 4k); 8 warps above d_h 128; 16-row tiles, no pipelining under the interpreter."""
    return _folded_config(head_dim, group == 1 or rows >= WIDE_TILE_ROWS)


@functools.lru_cache(maxsize=64)
def _folded_config(head_dim: int, wide: bool) -> GemmFwdConfig:
    if interpreting():
        return GemmFwdConfig(16, 4, 1, folded=True)
    bd = triton.next_power_of_2(head_dim)
    if bd == 128 and wide:
        return GemmFwdConfig(128, 4, 3, early_epilogue=True, folded=True)
    if bd <= 128:
        return GemmFwdConfig(64, 4, 2, early_epilogue=True, folded=True, max_regs=168)
    return GemmFwdConfig(64, 8, 2, early_epilogue=True, folded=True)


@triton.jit
def _folded_z(Q0, s_q0, K0, s_k0, MF, s_m0, s_m1, BF, CST, s_cn, s_cc, s_cp, hh, grow, offs, docs, row_ok,
              HQ: tl.constexpr, G: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
              HALF: tl.constexpr, RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, P: tl.constexpr,
              QK_MEAN: tl.constexpr, HAS_CST: tl.constexpr, HAS_BF: tl.constexpr, EARLY: tl.constexpr,
              DOT_PREC: tl.constexpr):  # fmt: skip
    """``z = bf + sum_s X[t + s - P] @ Mf[s]`` plus the qk-mean of head ``hh`` for the tile's rows ``grow`` (document
    ``docs``, in-document offsets ``offs``), as ``prologue_fwd._head_z``'s three fp32 column blocks. ``EARLY``: start
    the accumulators from the bias and qk-mean (loaded before the reduction loop) instead of adding them after it."""
    X, sx = _head_latents(Q0, s_q0, K0, s_k0, hh, HQ, DH)
    c0 = hh * DH
    DT = Q0.dtype.element_ty
    za = tl.zeros([grow.shape[0], RB], dtype=tl.float32)
    zb = tl.zeros([grow.shape[0], RB], dtype=tl.float32)
    zc = tl.zeros([grow.shape[0], NB], dtype=tl.float32)
    if EARLY:
        za, zb, zc = _bias_mean(za, zb, zc, Q0, s_q0, K0, s_k0, BF, hh, grow, row_ok, HQ, G, DH, HALF, RB, NOPE, NB,
                                QK_MEAN, HAS_BF)  # fmt: skip
    for kc in range(0, (P + 1) * BD, BK):
        s = kc // BD
        b = _chunk_cols(kc, BD, BK)
        b_ok = b < DH
        o = offs - (P - s)  # in-document offset of tap s's row
        ok = row_ok[:, None] & b_ok[None, :]
        a = tl.load(X + (grow - (P - s)).to(tl.int64)[:, None] * sx + b[None, :], mask=ok & (o >= 0)[:, None],
                    other=0.0)  # fmt: skip
        if HAS_CST:  # rows before the document: the initial conv state CST[doc, c0 + b, P + o]
            st = CST + docs.to(tl.int64)[:, None] * s_cn + (c0 + b[None, :]) * s_cc + (P + o)[:, None] * s_cp
            a = tl.where((o >= 0)[:, None], a, tl.load(st, mask=ok & (o < 0)[:, None], other=0.0).to(DT))
        za, zb, zc = _weight_dots(a, MF + s * s_m0 + b[:, None] * s_m1 + c0, za, zb, zc, b_ok, HALF, RB, NOPE, NB,
                                  DOT_PREC)  # fmt: skip
    if not EARLY:
        za, zb, zc = _bias_mean(za, zb, zc, Q0, s_q0, K0, s_k0, BF, hh, grow, row_ok, HQ, G, DH, HALF, RB, NOPE, NB,
                                QK_MEAN, HAS_BF)  # fmt: skip
    return za, zb, zc


@triton.jit
def _folded_gemm_kernel(
    Q0, K0, VC, VD, MF, BF, TEMP, COS, SIN, CU, CST, VST, Q, K, V,
    s_m0, s_m1, s_cn, s_cc, s_cp, s_q0, s_k0, s_vc, s_vd, s_cos, s_sin, s_vsn, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh,
    sqrt_dh, eps,
    HQ: tl.constexpr, HK: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
    RB: tl.constexpr, NOPE: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, QK_MEAN: tl.constexpr,
    VALUE_SHIFT: tl.constexpr, EXP_TEMP: tl.constexpr, HAS_CST: tl.constexpr, HAS_VST: tl.constexpr,
    HAS_BF: tl.constexpr, BT: tl.constexpr, EARLY: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """``z = bf + sum_s X[t + s - P] @ Mf[s]`` + the epilogue, for the rows of one tile of document ``program_id(2)``
    (``CU``/``CST``/``VST`` already offset to the launch's first document) and head ``program_id(1)``."""
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
    G: tl.constexpr = HQ // HK
    za, zb, zc = _folded_z(Q0, s_q0, K0, s_k0, MF, s_m0, s_m1, BF, CST, s_cn, s_cc, s_cp, hh, grow, offs, docs,
                           row_ok, HQ, G, DH, BD, BK, HALF, RB, NOPE, NB, P, QK_MEAN, HAS_CST, HAS_BF, EARLY,
                           DOT_PREC)  # fmt: skip
    _store_qk(za, zb, zc, TEMP, COS, SIN, Q, K, s_cos, s_sin, s_qt, s_qh, s_kt, s_kh, hh, grow, row_ok, sqrt_dh,
              eps, HQ, HALF, RB, NOPE, NB, EXP_TEMP)  # fmt: skip
    if hh >= HQ:
        _store_v(VC, VD, VST, V, s_vc, s_vd, s_vsn, s_vt, s_vh, hh - HQ, grow, offs, docs, row_ok, HK, DH, BD,
                 VALUE_SHIFT, HAS_VST)  # fmt: skip


def launch_folded_fwd(meta: Meta, q0, k0, v_cur, v_del, w1, b1, w2, b2, temperature, cos, sin, cu, max_seqlen, cst,
                      vst, q, k, v, *, config: GemmFwdConfig | None = None,
                      folded: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> None:  # fmt: skip
    """Prefill forward with both convolutions folded into one GEMM, writing ``q [T, h, d_h]``, ``k, v [T, h_k, d_h]``;
    arguments as :func:`trimformer.ops.cca.prologue_gemm.launch_gemm_fwd` (``config.folded`` is not read here).

    ``folded``: an optional precomputed ``fold_conv_weights(w1, b1, w2, b2, q0.dtype)`` (``mf`` contiguous); without
    it the weights are folded by one :func:`launch_fold` per call.
    """
    if meta.num_convs != 2:
        raise ValueError(f"the folded forward needs both convolutions, got {meta.num_convs}")
    cfg = config or default_folded_config(meta.dh, q0.shape[0], meta.hq // meta.hk)
    check_gemm_config(cfg)
    rows = q0.shape[0]
    if rows == 0 or max_seqlen == 0:
        return
    mf, bf = launch_fold(w1, b1, w2, b2, q0.dtype) if folded is None else folded
    c = (meta.hq + meta.hk) * meta.dh
    if tuple(mf.shape) != (meta.pad + 1, meta.dh, c) or mf.dtype != q0.dtype or mf.stride(-1) != 1:
        raise ValueError(f"folded weights must be [P + 1={meta.pad + 1}, d_h={meta.dh}, C={c}] {q0.dtype} with unit "
                         f"last stride, got {tuple(mf.shape)} {mf.dtype}")  # fmt: skip
    n_seq = cu.numel() - 1
    ce = meta.constexprs()
    bk = min(cfg.block_k, ce["BD"]) if cfg.block_k else ce["BK"]
    cs = _strides(cst, 3)
    dummy = q0
    ep = epilogue_args(meta, q0, k0, v_cur, v_del, cos, sin, vst, q, k, v)
    tiles = cdiv(max_seqlen, cfg.block_t)
    for s0 in range(0, n_seq, _MAX_GRID):
        n = min(_MAX_GRID, n_seq - s0)
        _folded_gemm_kernel[(tiles, meta.hq + meta.hk, n)](
            q0, k0, v_cur, v_del, mf, bf if bf is not None else dummy, temperature,
            cos if cos is not None else dummy, sin if sin is not None else dummy, cu[s0:] if s0 else cu,
            cst[s0:] if cst is not None else dummy, vst[s0:] if vst is not None else dummy, q, k, v,
            mf.stride(0), mf.stride(1), *cs, **ep, BK=bk, P=meta.pad, HAS_CST=cst is not None,
            HAS_BF=bf is not None, BT=cfg.block_t, EARLY=cfg.early_epilogue, DOT_PREC=dot_precision(q0.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **max_regs(cfg),
        )  # fmt: skip


__all__ = ["default_folded_config", "fold_conv_weights", "launch_fold", "launch_folded_fwd"]
