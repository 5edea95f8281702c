"""Plain-PyTorch reference for :func:`trimformer.ops.activation.bias_act`: the formulas written out (fp64, autograd)."""

from __future__ import annotations

import math

import torch

from trimformer.ops.activation.names import canonical_activation

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def naive_bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, *, inplace: bool = False) -> torch.Tensor:
    """``act(x + bias)`` computed in at least fp32 and cast back to ``x.dtype``; ``act`` is an HF name.
    ``inplace`` is accepted for signature parity and ignored (the reference never writes its inputs)."""
    kind = canonical_activation(act)
    h = x if bias is None else x + bias
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    if kind == "gelu_erf":
        y = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    elif kind == "gelu_tanh":
        y = 0.5 * h * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h * h * h)))
    elif kind == "quick_gelu":
        y = h / (1.0 + torch.exp(-1.702 * h))
    elif kind == "relu":
        y = torch.where(h > 0, h, torch.zeros_like(h))
    elif kind == "silu":
        y = h / (1.0 + torch.exp(-h))
    elif kind == "tanh":
        y = torch.tanh(h)
    else:
        y = h
    return y.to(x.dtype)
