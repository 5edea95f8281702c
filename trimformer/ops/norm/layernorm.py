"""Fused bias + residual + LayerNorm forward (Triton): one pass over ``x`` and ``residual``, fp32 statistics.

Math: ``h = x + x_bias + residual`` summed in fp32 (no intermediate rounding), ``y = (h - mean(h)) / sqrt(var(h) +
eps) * weight + bias`` with the biased variance, as ``torch.nn.functional.layer_norm``. A program owns ``ROWS``
whole rows (the row fits in registers for ``H <= 16384``), so the statistics are exact two-pass sums with no
Welford merging. Bytes per row: read ``x`` and ``residual``, write ``y`` (three passes instead of the five of
``x + b + r`` followed by ``F.layer_norm``). No host syncs; any number of rows.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trimformer.ops.triton_utils import (
    cdiv,
    dtype_reason,
    interpreting,
    next_power_of_2,
    num_sms,
    pdl_launch,
    pdl_trigger,
    pdl_wait,
)

MAX_HIDDEN = 16384


def unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the kernel cannot take ``x`` (``[..., H]``), or ``None`` when it can."""
    reason = dtype_reason(x)
    if reason is not None:
        return reason
    if x.shape[-1] > MAX_HIDDEN:
        return f"hidden size {x.shape[-1]} above {MAX_HIDDEN}"
    return None


@triton.jit
def _add_ln_fwd_kernel(
    X,
    R,
    W,
    B,
    XB,
    Y,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_y,
    eps,
    stride_xs,
    PARTS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_XBIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)  # [R]
    cols = tl.arange(0, BLOCK_H)  # [BH]
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    # constant parameters first: under PDL these loads overlap the previous kernel's tail
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_XBIAS:
        xb = tl.load(XB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pdl_wait(PDL)  # x, the residual and (in place) y may belong to the previous kernel
    x_ptrs = X + rows64[:, None] * stride_x + cols[None, :]
    if PARTS > 0:  # X holds PARTS fp32 partial products (split-K GEMM): sum them here, deterministic order
        h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [R, BH]
        for part in tl.static_range(1, PARTS):
            h += tl.load(x_ptrs + part * stride_xs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [R, BH]
    if HAS_XBIAS:
        h += xb
    if HAS_RES:
        h += tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    pdl_trigger(PDL)
    mean = tl.sum(h, 1) / n_cols  # [R]
    diff = tl.where(col_ok[None, :], h - mean[:, None], 0.0)
    var = tl.sum(diff * diff, 1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    y = diff * rstd[:, None] * w
    if HAS_BIAS:
        y += b
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def _launch_shape(h: int, n_bucket: int, sms: int) -> tuple[int, int, int]:
    """``(BLOCK_H, ROWS, num_warps)`` for a hidden size and a row count (bucketed to a power of two): about 4096
    elements per program (2048 under the interpreter), at least one whole row, and fewer rows per program while
    that leaves under two programs per SM (B = 1 forwards: 350 rows of 768 ran as 88 programs on 132 SMs)."""
    block_h = next_power_of_2(h)
    budget = 2048 if interpreting() else 4096
    rows = max(1, budget // block_h)
    while rows > 1 and cdiv(n_bucket, rows) < 2 * sms:
        rows //= 2
    warps = 4 if block_h * rows <= 4096 else (8 if block_h <= 8192 else 16)
    return block_h, rows, warps


def _rows_2d(t: torch.Tensor, h: int) -> torch.Tensor:
    """``t`` as ``[rows, H]`` with unit stride on ``H`` (a view when possible)."""
    t2 = t.reshape(-1, h)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_layer_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    x_bias: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the fused kernel; inputs are assumed validated by ``api.py``.

    Args:
        x: ``[..., H]`` fp16/bf16/fp32; residual: same shape or ``None``.
        weight: ``[H]``; bias, x_bias: ``[H]`` or ``None``; all in ``x``'s dtype.
        eps: added to the variance.
        out: optional ``[..., H]`` destination (may be ``x`` itself: each program reads its rows before writing).

    Returns:
        ``[..., H]`` in ``x``'s dtype.
    """
    h = x.shape[-1]
    x2 = _rows_2d(x, h)
    n = x2.shape[0]
    r2 = _rows_2d(residual, h) if residual is not None else x2
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, h)
    if n == 0:
        return y
    _launch(x2, 0, 0, r2 if residual is not None else None, weight, bias, x_bias, y2, eps)
    return y


def _launch(x2, parts, stride_parts, r2, weight, bias, x_bias, y2, eps) -> None:
    n, h = y2.shape
    block_h, rows, warps = _launch_shape(h, next_power_of_2(n), num_sms(y2.device))
    _add_ln_fwd_kernel[(cdiv(n, rows),)](
        x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight,
        x_bias if x_bias is not None else weight, y2,
        n, h, x2.stride(0), r2.stride(0) if r2 is not None else 0, y2.stride(0), float(eps), stride_parts,
        PARTS=parts, HAS_RES=r2 is not None, HAS_BIAS=bias is not None, HAS_XBIAS=x_bias is not None,
        ROWS=rows, BLOCK_H=block_h, num_warps=warps, **pdl_launch(y2.device, n),
    )  # fmt: skip


#: most partial products :func:`add_layer_norm_partials_fwd` sums (one unrolled load each).
MAX_PARTS = 8


def add_layer_norm_partials_fwd(
    parts: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    x_bias: torch.Tensor | None,
    *,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``LayerNorm(sum_s parts[s] + x_bias + residual)``: the reduction of a split-K GEMM fused into the add +
    LayerNorm kernel (the ``S`` partials, the bias and the residual summed in fp32, in a fixed order).

    Args:
        parts: ``[S, M, H]`` fp32 partial products (``1 <= S <= MAX_PARTS``), unit stride on ``H``.
        residual: ``[M, H]`` or ``None``; weight: ``[H]``; bias, x_bias: ``[H]`` or ``None``.
        eps: added to the variance.
        out_dtype: dtype of the result (the model's, e.g. the residual's).

    Returns:
        ``[M, H]`` in ``out_dtype`` (a new tensor: ``residual`` is not overwritten).
    """
    s, m, h = parts.shape
    if not 1 <= s <= MAX_PARTS or parts.dtype != torch.float32:
        raise ValueError(f"parts must be fp32 [S <= {MAX_PARTS}, M, H], got {parts.dtype} {tuple(parts.shape)}")
    if parts.stride(-1) != 1 or parts.stride(1) != h:
        parts = parts.contiguous()
    y = torch.empty((m, h), dtype=out_dtype, device=parts.device)
    if m == 0:
        return y
    r2 = _rows_2d(residual, h) if residual is not None else None
    _launch(parts[0], s, parts.stride(0), r2, weight, bias, x_bias, y, eps)
    return y


__all__ = ["MAX_HIDDEN", "MAX_PARTS", "add_layer_norm_fwd", "add_layer_norm_partials_fwd", "unsupported_reason"]
