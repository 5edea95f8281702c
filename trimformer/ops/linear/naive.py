"""Plain-PyTorch reference for :func:`trimformer.ops.linear.linear` (any device, fp64, autograd)."""

from __future__ import annotations

import torch

from trimformer.ops.activation.naive import naive_bias_act


def naive_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None
) -> torch.Tensor:
    """``act(x @ weight^T + bias)`` with the product and the epilogue in at least fp32, one rounding at the end.

    Args:
        x: ``[..., K]``; weight: ``[N, K]`` (``nn.Linear`` layout); bias: ``[N]`` or ``None``.
        act: an HF activation name, or ``None`` for none.

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    y = x.to(acc) @ weight.to(acc).transpose(0, 1)
    b = None if bias is None else bias.to(acc)
    if act is not None:
        return naive_bias_act(y, b, act).to(x.dtype)
    return (y if b is None else y + b).to(x.dtype)


def naive_linear_add_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    *,
    eps: float,
) -> torch.Tensor:
    """``LayerNorm(x @ weight^T + bias + residual)`` in at least fp32 throughout, one rounding at the end.

    Args:
        x: ``[..., K]``; weight: ``[N, K]``; bias: ``[N]`` or ``None``; residual: ``[..., N]`` or ``None``.
        ln_weight: ``[N]``; ln_bias: ``[N]`` or ``None``; eps: added to the (biased) variance.

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc) @ weight.to(acc).transpose(0, 1)
    if bias is not None:
        h = h + bias.to(acc)
    if residual is not None:
        h = h + residual.to(acc)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).pow(2).mean(-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps) * ln_weight.to(acc)
    if ln_bias is not None:
        y = y + ln_bias.to(acc)
    return y.to(x.dtype)
