"""Plain-PyTorch references for the rotary position embedding ops (CPU, any float dtype incl. float64, autograd).

The reference rotates through complex multiplication, which shares no code with the rotate-half formula of
``api.py``: dims ``i`` and ``i + rotary_dim / 2`` (NeoX layout) form the complex number ``x_i + j x_{i + r/2}``,
multiplied by ``exp(j * pos * theta^(-2i / rotary_dim))``.
"""

from __future__ import annotations

import math

import torch


def naive_rotary_cos_sin(
    positions: torch.Tensor, rotary_dim: int, theta: float, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference :func:`trimformer.ops.rope.rotary_cos_sin`: angles built one frequency at a time with ``math``.

    Args:
        positions: integer positions of any shape ``[*]``.
        rotary_dim: number of rotated dims (even).
        theta: RoPE base.
        dtype: dtype of the returned tables.

    Returns:
        ``(cos, sin)``, each ``[*, rotary_dim // 2]`` in ``dtype``.
    """
    pos = positions.to(torch.float64)
    half = rotary_dim // 2
    cols = [pos * (1.0 / math.pow(theta, 2.0 * i / rotary_dim)) for i in range(half)]
    angles = torch.stack(cols, dim=-1) if cols else pos.new_zeros(*pos.shape, 0)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def naive_apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int | None = None
) -> torch.Tensor:
    """Reference :func:`trimformer.ops.rope.apply_rotary` through complex multiplication.

    Args:
        x: ``[*, H, D]``.
        cos, sin: ``[*, rotary_dim // 2]`` (leading dims as ``x`` without the head dim).
        rotary_dim: rotated dims, default ``2 * cos.shape[-1]``.

    Returns:
        ``[*, H, D]`` in the dtype of ``x``.
    """
    r = 2 * cos.shape[-1] if rotary_dim is None else rotary_dim
    half = r // 2
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = x[..., :r].to(wide)
    z = torch.complex(xr[..., :half], xr[..., half:])
    rot = torch.complex(cos.to(wide), sin.to(wide)).unsqueeze(-2)
    out = z * rot
    rotated = torch.cat([out.real, out.imag], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., r:]], dim=-1)
