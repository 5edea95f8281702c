"""Small helpers shared by the Triton launchers: interpreter detection, block sizing, device facts.

Nothing here launches a kernel or reads device memory; every helper is host-only and cheap.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).

    Read once, like Triton itself, which decides at ``@triton.jit`` decoration time.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dtype_reason(x: torch.Tensor) -> str | None:
    """Why a Triton kernel of this package cannot take ``x``'s dtype on ``x``'s device, or ``None``: fp16, bf16 and
    fp32 only, and no bf16 on the CPU interpreter (its bf16 arithmetic is broken)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (supported: float16, bfloat16, float32)"
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return "bfloat16 under the Triton CPU interpreter (its bf16 arithmetic is broken; use float16 or float32)"
    return None


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints (``triton.cdiv`` called from Python is a slow JIT-function call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def padded_head_dim(d: int) -> int:
    """Tile width for a head dim ``d``: the next power of two, at least 16 (the smallest ``tl.dot`` size)."""
    return max(16, next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs, the native tensor-core path otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed 4 on the CPU interpreter); cached, no device sync."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
