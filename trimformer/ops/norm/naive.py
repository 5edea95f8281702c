"""Plain-PyTorch reference for :func:`trimformer.ops.norm.add_layer_norm` (any device, fp64, autograd)."""

from __future__ import annotations

import torch


def naive_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    eps: float,
    x_bias: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """``LayerNorm((x + x_bias) + residual)`` written out: the sum is rounded to ``x.dtype``, then mean and biased
    variance are taken in at least fp32 (fp64 stays fp64) and the result is cast back to ``x.dtype``.
    ``inplace`` is accepted for signature parity and ignored (the reference never writes its inputs)."""
    h = x
    if x_bias is not None:
        h = h + x_bias
    if residual is not None:
        h = h + residual
    acc = torch.promote_types(h.dtype, torch.float32)
    h32 = h.to(acc)
    mean = h32.mean(-1, keepdim=True)
    var = (h32 - mean).pow(2).mean(-1, keepdim=True)
    y = (h32 - mean) / torch.sqrt(var + eps) * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
