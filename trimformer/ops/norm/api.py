"""``add_layer_norm``: LayerNorm(x [+ x_bias] [+ residual]) with fp32 statistics — the post-LN epilogue of an encoder.

``impl`` selects the implementation:

* ``"auto"``: the fused Triton kernel (``layernorm.py``) on CUDA when it supports the input and no gradient is
  needed, else ``"torch"``;
* ``"triton"``: the fused kernel (forward only); raises if it cannot run the input (never falls back);
* ``"torch"``: PyTorch ops (one add per term, then ``F.layer_norm``, whose kernels accumulate in fp32);
* ``"naive"``: the plain reference in ``naive.py``.

The kernel module ``trimformer/ops/norm/layernorm.py`` (``unsupported_reason(x)``, ``add_layer_norm_fwd(...)``) is
imported on first use; a build without Triton has ``"torch"`` only.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Literal

import torch
import torch.nn.functional as F

Impl = Literal["auto", "triton", "torch", "naive"]
_IMPLS = ("auto", "triton", "torch", "naive")
_KERNEL_MODULE = "trimformer.ops.norm.layernorm"


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    eps: float,
    x_bias: torch.Tensor | None = None,
    inplace: bool = False,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``LayerNorm(x + x_bias + residual)`` over the last dimension.

    Args:
        x: ``[..., H]`` (fp32, fp16 or bf16), e.g. a GEMM output without its bias.
        residual: ``[..., H]`` like ``x``, or ``None``.
        weight: ``[H]`` LayerNorm scale; bias: ``[H]`` LayerNorm shift or ``None``.
        eps: added to the variance.
        x_bias: ``[H]`` bias added to ``x`` before the residual (the GEMM bias fused here), or ``None``.
        inplace: ``x`` may be overwritten (its contents are undefined afterwards): pass it for temporaries such as
            GEMM outputs, so the PyTorch path adds bias and residual without allocating. Ignored under autograd.
        impl: see the module docstring.

    Returns:
        ``[..., H]`` in the dtype of ``x``. Mean and variance are computed in fp32 for half-precision inputs. The
        ``"torch"``/``"naive"`` paths round the sum ``(x + x_bias) + residual`` to ``x``'s dtype first (HF's order:
        bias, then residual); the Triton kernel forms it in fp32 (one rounding fewer).
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not torch.compiler.is_compiling():
        _check(x, residual, weight, bias, x_bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight, bias, x_bias)
    )
    if impl == "auto":
        impl = "triton" if x.is_cuda and not needs_grad and _kernel_reason(x) is None else "torch"
    if impl == "naive":
        from trimformer.ops.norm.naive import naive_add_layer_norm

        return naive_add_layer_norm(x, residual, weight, bias, eps=eps, x_bias=x_bias, inplace=inplace)
    if impl == "torch":
        return torch_add_layer_norm(x, residual, weight, bias, eps=eps, x_bias=x_bias, inplace=inplace)
    reason = "inputs require grad (the fused kernel is forward-only)" if needs_grad else _kernel_reason(x)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run add_layer_norm: {reason}")
    out = x if inplace and x.is_contiguous() else None
    return _kernel_module().add_layer_norm_fwd(x, residual, weight, bias, eps, x_bias, out=out)


def torch_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    eps: float,
    x_bias: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """The ``"torch"`` implementation (no validation): at most two adds, then ``F.layer_norm``."""
    own = inplace and not (torch.is_grad_enabled() and x.requires_grad)
    h = x
    if x_bias is not None:
        h = h.add_(x_bias) if own else h + x_bias
        own = own or not h.requires_grad  # h is now our own temporary unless autograd tracks it
    if residual is not None:
        h = h.add_(residual) if own else h + residual
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps)


def _check(x, residual, weight, bias, x_bias) -> None:
    h = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or h == 0:
        raise ValueError(f"add_layer_norm expects x of shape [..., H] with H > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"add_layer_norm expects a floating-point x, got {x.dtype}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if t is not None and t.shape != (h,):
            raise ValueError(f"{name} must have shape ({h},), got {tuple(t.shape)}")
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


def _kernel_reason(x: torch.Tensor) -> str | None:
    """Why the fused kernel cannot take ``x`` here, or ``None`` when it can."""
    layernorm = _kernel_module()
    if layernorm is None:
        return "the fused Triton LayerNorm kernel is not available in this build"
    if not (x.is_cuda or (os.environ.get("TRITON_INTERPRET", "0") == "1" and x.device.type == "cpu")):
        return f"tensors on {x.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    return layernorm.unsupported_reason(x)


@functools.cache
def _kernel_module():
    """The fused-kernel module, or ``None`` when this build has none (looked up once)."""
    try:
        return importlib.import_module(_KERNEL_MODULE)
    except ImportError:
        return None
