"""Rotary position embedding forward (Triton): one launch rotates every head of ``[T, H, D]``, math in fp32.

NeoX rotate-half with partial rotation, the formula of ``api.py``: ``y1 = x1 cos - x2 sin``, ``y2 = x2 cos + x1 sin``
over the first ``r`` dims (``x1 = x[..., :r/2]``, ``x2 = x[..., r/2:r]``), dims ``r..D`` copied. One program handles
a ``[BLOCK_T, BLOCK_H, r/2]`` tile: the cos/sin rows of its tokens are loaded once and shared by every head, so a
model that rotates queries and keys together (a ``[T, 2H, D]`` view of its fused QKV output) pays one launch and one
pass over them instead of about a dozen elementwise PyTorch kernels per tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trimformer.ops.triton_utils import (
    cdiv,
    dtype_reason,
    interpreting,
    next_power_of_2,
    pdl_launch,
    pdl_trigger,
    pdl_wait,
)


def unsupported_reason(x: torch.Tensor, cos: torch.Tensor) -> str | None:
    """Why the kernel cannot rotate ``x`` with tables ``cos``, or ``None`` when it can."""
    reason = dtype_reason(x)
    if reason is not None:
        return reason
    if cos.dtype != torch.float32:
        return f"cos/sin dtype {cos.dtype} (the kernel reads float32 tables)"
    if x.stride(-1) != 1:
        return "x's last dim is not contiguous"
    return None


@triton.jit
def _rope_fwd_kernel(
    X,
    COS,
    SIN,
    Y,
    n_tokens,
    n_heads,
    stride_xt,
    stride_xh,
    stride_yt,
    stride_yh,
    stride_ct,
    HALF: tl.constexpr,
    REST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_REST: tl.constexpr,
    PDL: tl.constexpr = 0,
):
    pdl_wait(PDL)  # x and the cos/sin tables (built per batch) may come from the previous kernel
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    t64 = t.to(tl.int64)
    tok_ok = t < n_tokens
    row_ok = tok_ok[:, None, None] & (h < n_heads)[None, :, None]
    mask = row_ok & (d < HALF)[None, None, :]
    cs_off = t64[:, None] * stride_ct + d[None, :]
    cs_mask = tok_ok[:, None] & (d < HALF)[None, :]
    c = tl.load(COS + cs_off, mask=cs_mask, other=0.0)[:, None, :]
    s = tl.load(SIN + cs_off, mask=cs_mask, other=0.0)[:, None, :]
    x_row = X + t64[:, None, None] * stride_xt + h[None, :, None] * stride_xh
    y_row = Y + t64[:, None, None] * stride_yt + h[None, :, None] * stride_yh
    x1 = tl.load(x_row + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
    pdl_trigger(PDL)
    tl.store(y_row + d[None, None, :], (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + HALF + d[None, None, :], (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)
    if REST > 0:  # NoPE dims pass through
        e = tl.arange(0, BLOCK_REST)
        rest_mask = row_ok & (e < REST)[None, None, :]
        tail = tl.load(x_row + 2 * HALF + e[None, None, :], mask=rest_mask, other=0.0)
        tl.store(y_row + 2 * HALF + e[None, None, :], tail, mask=rest_mask)


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Launch the kernel; inputs are assumed validated by ``api.py``.

    Args:
        x: ``[*, H, D]`` fp16/bf16/fp32, last dim contiguous (other strides free, e.g. a slice of a QKV buffer).
        cos, sin: ``[*, rotary_dim // 2]`` float32, leading dims equal to ``x``'s without ``H``.
        rotary_dim: rotated dims (even, ``<= D``, ``> 0``).

    Returns:
        ``[*, H, D]`` new contiguous tensor in ``x``'s dtype.
    """
    heads, dim = x.shape[-2], x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = y.numel() // (heads * dim) if y.numel() else 0
    if n == 0:
        return y
    x3 = x.reshape(n, heads, dim)  # a view whenever the token dims of x merge (every caller's case)
    c2, s2 = cos.reshape(n, -1), sin.reshape(n, -1)
    if not (c2.stride(-1) == 1 and s2.stride(-1) == 1 and c2.stride(0) == s2.stride(0)):
        c2, s2 = c2.contiguous(), s2.contiguous()
    y3 = y.view(n, heads, dim)
    half, rest = rotary_dim // 2, dim - rotary_dim
    block_half = next_power_of_2(half)
    block_h = min(next_power_of_2(heads), max(1, 256 // block_half))
    block_t = max(1, (512 if interpreting() else 4096) // (block_h * block_half))
    _rope_fwd_kernel[(cdiv(n, block_t), cdiv(heads, block_h))](
        x3, c2, s2, y3, n, heads, x3.stride(0), x3.stride(1), y3.stride(0), y3.stride(1), c2.stride(0),
        HALF=half, REST=rest, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_REST=next_power_of_2(max(rest, 1)), num_warps=4, **pdl_launch(x.device, n),
    )  # fmt: skip
    return y


__all__ = ["rope_fwd", "unsupported_reason"]
