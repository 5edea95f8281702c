"""``bias_act``: ``act(x + bias)``, the FFN epilogue of an encoder, for the activations BERT-family configs name.

Activation names follow HF ``hidden_act`` strings (see :data:`ACTIVATIONS`):

* exact GELU (erf): ``"gelu"``, ``"gelu_python"``;
* tanh-approximated GELU: ``"gelu_new"``, ``"gelu_fast"``, ``"gelu_accurate"``, ``"gelu_pytorch_tanh"``,
  ``"gelu_python_tanh"`` (one formula, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``);
* ``"quick_gelu"`` (``x * sigmoid(1.702 x)``), ``"relu"``, ``"silu"`` / ``"swish"``, ``"tanh"``, ``"linear"``.

``impl`` selects the implementation: ``"auto"`` (the fused Triton kernel of ``fused.py`` on CUDA when no gradient
is needed, else ``"torch"``), ``"triton"`` (forward only; raises when it cannot run the input), ``"torch"``
(PyTorch ops) or ``"naive"`` (the formulas in ``naive.py``).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Literal

import torch
import torch.nn.functional as F

from trimformer.ops.activation.names import ACTIVATIONS, canonical_activation

Impl = Literal["auto", "triton", "torch", "naive"]
_IMPLS = ("auto", "triton", "torch", "naive")
_KERNEL_MODULE = "trimformer.ops.activation.fused"
__all__ = ["ACTIVATIONS", "bias_act", "canonical_activation", "torch_bias_act"]


def bias_act(
    x: torch.Tensor, bias: torch.Tensor | None, act: str, *, inplace: bool = False, impl: Impl = "auto"
) -> torch.Tensor:
    """``act(x + bias)`` elementwise.

    Args:
        x: ``[..., F]`` (fp32, fp16 or bf16), e.g. the first FFN GEMM without its bias.
        bias: ``[F]`` or ``None``.
        act: an HF activation name (see the module docstring).
        inplace: ``x`` may be overwritten and the result may alias it: pass it for temporaries such as GEMM
            outputs, so the PyTorch path allocates nothing. Ignored under autograd.
        impl: see the module docstring.

    Returns:
        ``[..., F]`` in the dtype of ``x``.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    kind = canonical_activation(act)
    if not torch.compiler.is_compiling():
        if not x.is_floating_point():
            raise ValueError(f"bias_act expects a floating-point x, got {x.dtype}")
        if bias is not None and (bias.shape != (x.shape[-1],) or bias.dtype != x.dtype or bias.device != x.device):
            raise ValueError(
                f"bias must be [{x.shape[-1]}] {x.dtype} on {x.device}, got {tuple(bias.shape)} {bias.dtype} "
                f"on {bias.device}"
            )
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if impl == "auto":
        impl = "triton" if x.is_cuda and not needs_grad and _kernel_reason(x, kind) is None else "torch"
    if impl == "naive":
        from trimformer.ops.activation.naive import naive_bias_act

        return naive_bias_act(x, bias, act, inplace=inplace)
    if impl == "torch":
        return torch_bias_act(x, bias, kind, inplace=inplace)
    reason = "inputs require grad (the fused kernel is forward-only)" if needs_grad else _kernel_reason(x, kind)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run bias_act: {reason}")
    return _kernel_module().bias_act_fwd(x, bias, kind, out=x if inplace and x.is_contiguous() else None)


def torch_bias_act(x: torch.Tensor, bias: torch.Tensor | None, kind: str, *, inplace: bool = False) -> torch.Tensor:
    """The ``"torch"`` implementation for a canonical ``kind`` (no validation)."""
    tracked = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    own = inplace and not tracked
    if bias is None:
        h = x
    else:
        h = x.add_(bias) if own else x + bias
        own = not tracked  # a fresh sum is ours to overwrite
    if kind == "gelu_erf":
        return torch.ops.aten.gelu_(h) if own else F.gelu(h)
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_(h, approximate="tanh") if own else F.gelu(h, approximate="tanh")
    if kind == "relu":
        return F.relu(h, inplace=own)
    if kind == "silu":
        return F.silu(h, inplace=own)
    if kind == "quick_gelu":
        gate = torch.sigmoid(1.702 * h)
        return h.mul_(gate) if own else h * gate
    if kind == "tanh":
        return torch.tanh_(h) if own else torch.tanh(h)
    return h


def _kernel_reason(x: torch.Tensor, kind: str) -> str | None:
    """Why the fused kernel cannot take ``x`` here, or ``None`` when it can."""
    kernel = _kernel_module()
    if kernel is None:
        return "the fused Triton bias+activation kernel is not available in this build"
    if not (x.is_cuda or (os.environ.get("TRITON_INTERPRET", "0") == "1" and x.device.type == "cpu")):
        return f"tensors on {x.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    return kernel.unsupported_reason(x, kind)


@functools.cache
def _kernel_module():
    """The fused-kernel module, or ``None`` when this build has none (looked up once)."""
    try:
        return importlib.import_module(_KERNEL_MODULE)
    except ImportError:
        return None
