"""``linear``: ``act(x @ W^T + b)``, the GEMMs of an encoder with their epilogue fused.

``impl`` selects the implementation:

* ``"auto"``: on CUDA, without an activation, cuBLAS (``F.linear``, bias in cuBLAS's epilogue; up to
  :data:`SMALL_M` rows in fp16/bf16 the Triton GEMM instead where it measured faster); with one, either
  the Triton GEMM with the bias and activation in its epilogue (``gemm.py``) or cuBLAS followed by the fused
  bias + activation kernel (``trimformer.ops.activation``), whichever measured faster for the shape on this GPU
  (``tune.py``: timed once per shape bucket, outside CUDA-graph captures). On CPU (or when autograd needs
  gradients): ``"torch"``.
* ``"triton"``: the Triton GEMM (forward only); raises when it cannot run the input.
* ``"torch"``: ``F.linear`` then :func:`trimformer.ops.activation.bias_act` with ``impl="torch"`` in place (the
  CPU path: no extra allocation).
* ``"naive"``: the reference in ``naive.py``.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Literal

import torch
import torch.nn.functional as F

from trimformer.ops.activation import bias_act, canonical_activation
from trimformer.ops.activation.api import torch_bias_act

Impl = Literal["auto", "triton", "torch", "naive"]
_IMPLS = ("auto", "triton", "torch", "naive")

#: ``"auto"`` policy for GEMMs with an activation: ``"measured"`` (the per-shape search of ``tune.py``),
#: ``"always"`` (Triton GEMM epilogue, shape-only config) or ``"never"`` (cuBLAS + fused bias-activation kernel).
#: Benchmarks switch it.
EPILOGUE_POLICY = {"mode": "measured"}
#: GEMMs without an activation are measured against cuBLAS only up to this many rows (latency-bound sizes, where
#: small Triton tiles can beat cuBLAS's choice); larger ones always run cuBLAS.
SMALL_M = 512


def use_gemm_epilogue(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether ``"auto"`` runs an ``[m, k] x [k, n]`` GEMM with an activation as one Triton GEMM with a fused
    epilogue (``True``) rather than cuBLAS + the fused bias-activation kernel (``False``), as far as known without
    measuring: the forced policies, or in ``"measured"`` mode a choice already made by ``tune.py`` for a CUDA GEMM
    (any activation) of this shape bucket on the current device.
    """
    mode = EPILOGUE_POLICY["mode"]
    if mode != "measured":
        return mode == "always"
    if not torch.cuda.is_available():
        return False
    from trimformer.ops.linear import tune

    return tune.chose_triton(m, n, k, dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """``act(x @ weight^T + bias)``.

    Args:
        x: ``[..., K]`` (fp32, fp16 or bf16).
        weight: ``[N, K]`` (``nn.Linear`` layout), ``x``'s dtype and device.
        bias: ``[N]`` or ``None``.
        act: an HF activation name (``"gelu"`` is exact erf GELU, ``"gelu_new"`` the tanh form, ...) or ``None``.
        impl: see the module docstring.

    Returns:
        ``[..., N]`` in ``x``'s dtype; the product is accumulated in fp32 on every path.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    kind = "identity" if act is None else canonical_activation(act)
    if not torch.compiler.is_compiling():
        _check(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if impl == "auto":
        if not x.is_cuda or needs_grad:
            impl = "torch"
        elif act is None:
            k = x.shape[-1]
            if EPILOGUE_POLICY["mode"] == "measured" and 0 < x.numel() <= SMALL_M * k and x.dtype != torch.float32:
                from trimformer.ops.linear import tune

                cfg = tune.choose(x, weight, bias, "identity", lambda w: F.linear(x, w, bias))
                if cfg is not None:
                    return _kernel_module().linear_fwd(x, weight, bias, "identity", config=cfg)
            return F.linear(x, weight, bias)
        else:
            mode = EPILOGUE_POLICY["mode"]
            if mode != "never" and _kernel_reason(x, weight, kind) is None and x.numel():
                if mode == "always":
                    return _kernel_module().linear_fwd(x, weight, bias, kind)
                from trimformer.ops.linear import tune

                cfg = tune.choose(x, weight, bias, kind, lambda w: bias_act(F.linear(x, w), bias, act, inplace=True))
                if cfg is not None:
                    return _kernel_module().linear_fwd(x, weight, bias, kind, config=cfg)
            return bias_act(F.linear(x, weight), bias, act, inplace=True)
    if impl == "naive":
        from trimformer.ops.linear.naive import naive_linear

        return naive_linear(x, weight, bias, act)
    if impl == "torch":
        if act is None:
            return F.linear(x, weight, bias)
        return torch_bias_act(F.linear(x, weight), bias, kind, inplace=True)
    reason = "inputs require grad (the Triton GEMM is forward-only)" if needs_grad else _kernel_reason(x, weight, kind)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run linear: {reason}")
    return _kernel_module().linear_fwd(x, weight, bias, kind)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"linear expects a floating-point x of shape [..., K], got {x.dtype} {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


def _kernel_reason(x: torch.Tensor, weight: torch.Tensor, kind: str) -> str | None:
    gemm = _kernel_module()
    if gemm is None:
        return "the Triton GEMM is not available in this build"
    if not (x.is_cuda or (os.environ.get("TRITON_INTERPRET", "0") == "1" and x.device.type == "cpu")):
        return f"tensors on {x.device} (needs CUDA, or CPU with TRITON_INTERPRET=1)"
    return gemm.unsupported_reason(x, weight, kind)


@functools.cache
def _kernel_module():
    """The Triton GEMM module, or ``None`` when this build has no Triton (looked up once)."""
    try:
        return importlib.import_module("trimformer.ops.linear.gemm")
    except ImportError:
        return None
