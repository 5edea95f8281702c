"""Rotary position embeddings (RoPE), NeoX rotate-half layout, with partial rotation.

Conventions (those of GPT-NeoX, Llama and HF ``apply_rotary_pos_emb``): the first ``rotary_dim`` dims of every head
are rotated, pairing dim ``i`` with dim ``i + rotary_dim / 2``; the remaining ``D - rotary_dim`` dims pass through
unchanged ("NoPE" dims). Frequencies are ``theta ** (-2i / rotary_dim)`` for ``i < rotary_dim / 2``.

``impl`` of :func:`apply_rotary`: ``"auto"`` takes the one-launch Triton kernel of ``kernel.py`` on CUDA when no
gradient is needed (else ``"torch"``); ``"triton"`` that kernel (forward only; raises when it cannot run the input);
``"torch"`` the PyTorch formula here; ``"naive"`` the complex-number reference. The CCA layers do not call it: RoPE
is fused into their prologue kernels. :func:`rotary_cos_sin` has no kernel (``"triton"`` raises there).
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch

Impl = Literal["auto", "triton", "torch", "naive"]
_IMPLS = ("auto", "triton", "torch", "naive")


def _check_impl(impl: str) -> None:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _kernel_module():
    return importlib.import_module("trimformer.ops.rope.kernel")


def rotary_inv_freq(rotary_dim: int, theta: float, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / rotary_dim)``, ``[rotary_dim // 2]``, computed in ``dtype`` (float32:
    bit-identical to HF transformers' default RoPE)."""
    exponent = torch.arange(0, rotary_dim, 2, device=device, dtype=dtype) / rotary_dim
    return 1.0 / (theta**exponent)


def rotary_cos_sin(
    positions: torch.Tensor,
    rotary_dim: int,
    theta: float,
    *,
    dtype: torch.dtype = torch.float32,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables for the given positions.

    Angles are computed like HF transformers (``float32`` inverse frequencies times ``float32`` positions) unless
    ``dtype`` is ``float64``, in which case everything is float64.

    Args:
        positions: integer positions, any shape ``[*]`` (e.g. ``[T]`` packed, ``[B, S]`` dense, or
            ``torch.arange(max_len)`` for a lookup table).
        rotary_dim: number of rotated dims per head; even, ``>= 0``.
        theta: RoPE base (``> 0``).
        dtype: ``float32`` (default) or ``float64``.
        impl: see the module docstring.

    Returns:
        ``(cos, sin)``, each ``[*, rotary_dim // 2]`` in ``dtype``.
    """
    _check_impl(impl)
    if impl == "triton":
        raise ValueError("impl='triton': rotary_cos_sin has no kernel (tables are built once per batch); use 'auto'")
    if rotary_dim < 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even non-negative int, got {rotary_dim}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")
    if positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if impl == "naive":
        from trimformer.ops.rope.naive import naive_rotary_cos_sin

        return naive_rotary_cos_sin(positions, rotary_dim, theta, dtype=dtype)
    inv_freq = rotary_inv_freq(rotary_dim, theta, device=positions.device, dtype=dtype)
    angles = positions.to(dtype)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotary_dim: int | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of every head (NeoX rotate-half); the rest pass through.

    ``out[..., :r/2] = x1 cos - x2 sin`` and ``out[..., r/2:r] = x2 cos + x1 sin`` with ``x1 = x[..., :r/2]``,
    ``x2 = x[..., r/2:r]``. The arithmetic is done in float32 (float64 for float64 input) and cast back.

    Args:
        x: ``[*, H, D]`` queries or keys (any float dtype).
        cos, sin: ``[*, rotary_dim // 2]`` from :func:`rotary_cos_sin`, leading dims equal to ``x``'s without ``H``.
        rotary_dim: rotated dims, default ``2 * cos.shape[-1]``; even, ``<= D``.
        impl: see the module docstring.

    Returns:
        ``[*, H, D]`` in the dtype of ``x`` (a new tensor; ``x`` is not modified).
    """
    _check_impl(impl)
    r = 2 * cos.shape[-1] if rotary_dim is None else int(rotary_dim)
    if not torch.compiler.is_compiling():
        if x.dim() < 2:
            raise ValueError(f"x must be [*, H, D], got shape {tuple(x.shape)}")
        if r != 2 * cos.shape[-1] or cos.shape != sin.shape:
            raise ValueError(
                f"cos/sin must both be [*, rotary_dim // 2] = [*, {r // 2}], got {tuple(cos.shape)} and "
                f"{tuple(sin.shape)}"
            )
        if r % 2 or r > x.shape[-1]:
            raise ValueError(f"rotary_dim must be even and <= head dim {x.shape[-1]}, got {r}")
        if cos.shape[:-1] != x.shape[:-2]:
            raise ValueError(
                f"cos/sin leading dims {tuple(cos.shape[:-1])} must equal x's without heads {tuple(x.shape[:-2])}"
            )
    if r == 0:
        return x.clone()
    if impl == "naive":
        from trimformer.ops.rope.naive import naive_apply_rotary

        return naive_apply_rotary(x, cos, sin, r)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)
    if impl == "triton" or (impl == "auto" and x.is_cuda):
        kernel = _kernel_module()
        reason = "inputs require grad (the kernel is forward-only)" if needs_grad else kernel.unsupported_reason(x, cos)
        if reason is None and cos.device != x.device:
            reason = f"cos/sin on {cos.device}, x on {x.device}"
        if reason is None:
            return kernel.rope_fwd(x, cos, sin.to(cos.dtype), r)
        if impl == "triton":
            raise ValueError(f"impl='triton' cannot run apply_rotary: {reason}")
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = r // 2
    c = cos.to(wide).unsqueeze(-2)
    s = sin.to(wide).unsqueeze(-2)
    x1 = x[..., :half].to(wide)
    x2 = x[..., half:r].to(wide)
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    if r == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., r:]], dim=-1)
