"""Small helpers shared by the Triton launchers: interpreter detection, block sizing, device facts, and programmatic
dependent launch (PDL).

Nothing here launches a kernel or reads device memory; the host helpers are cheap, the ``@triton.jit`` ones are
inlined into the kernels that call them.

**PDL** (sm_90+, :func:`pdl_mode`): a kernel launched with ``launch_pdl=True`` may start while the previous kernel
on the stream drains (after every program of that one has called :func:`gdc_launch_dependents` or exited). Each
kernel of this package that supports it takes a ``PDL: tl.constexpr`` mode and, when it is not 0, calls
:func:`pdl_wait` before its first global read of anything an earlier kernel may have written *and* before its first
global store (the caching allocator hands a freed buffer to the next op while the previous kernel may still read
it); only constant inputs (weights, biases, LayerNorm parameters) are touched before it, and :func:`prefetch_l2` may
pull weights into L2 there. Every program of a PDL-launched kernel executes the wait, so completion stays transitive
along the stream: a kernel that finished implies every kernel before it finished. Where a kernel lets the next one
launch is the mode: :data:`PDL_LATE` after its main loop (:func:`pdl_trigger`, before the epilogue),
:data:`PDL_EARLY` right after its own wait (the next kernel's prologue, e.g. its weight prefetch, then overlaps this
whole kernel; it cannot run further ahead, since that kernel triggers only after its own wait). ``TRIMFORMER_PDL``
picks it: ``0`` off (A/B measurements, debugging), ``late`` or ``early`` at every size, unset or ``1``
:data:`PDL_DEFAULT` for kernels of at most :data:`PDL_MAX_ROWS` rows (tokens) and off above (H100: PDL took 8-20%
off B = 1 forwards of <= 512 tokens, and measured 2-8% slower at 1.4-4.8k tokens). The CPU interpreter and
pre-Hopper GPUs never use PDL.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

try:  # grid dependency control (triton >= 3.2); without it the kernels' PDL branches are never compiled
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # pragma: no cover - old Triton
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        """No-op stand-in (this Triton has no grid dependency control)."""
        pass

    @triton.jit
    def gdc_launch_dependents():
        """No-op stand-in (this Triton has no grid dependency control)."""
        pass


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


#: PDL modes (the kernels' ``PDL`` constexpr): off, trigger the next kernel after the main loop, right after the wait.
PDL_OFF, PDL_LATE, PDL_EARLY = 0, 1, 2
#: the mode used when ``TRIMFORMER_PDL`` is unset or ``1`` (H100 measurements: ops/linear/NOTES.md, round 5) ...
PDL_DEFAULT = PDL_EARLY
#: ... for kernels over at most this many rows (tokens); a power of two, so that a GEMM's row bucket (the tuner's
#: key) decides it. Every kernel of one encoder forward sees the same token count: all PDL or none.
PDL_MAX_ROWS = 1024
_PDL_ENV = {"0": PDL_OFF, "off": PDL_OFF, "late": PDL_LATE, "early": PDL_EARLY}


@functools.cache
def _sm90_index(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def is_sm90(device: torch.device) -> bool:
    """Whether a CUDA ``device`` has compute capability >= 9.0 (Hopper: PDL, TMA)."""
    return _sm90_index(device.index if device.index is not None else torch.cuda.current_device())


def tma_device_reason(t: torch.Tensor) -> str | None:
    """Why tensors like ``t`` cannot be read through host TMA descriptors (Triton support, dtype, device), or
    ``None``: fp16/bf16 on a Hopper (sm_90+) GPU or the CPU interpreter. Shape and stride rules stay per kernel."""
    if TensorDescriptor is None:
        return "this Triton has no host tensor descriptors"
    if t.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {t.dtype} (TMA loads take float16/bfloat16)"
    if t.is_cuda:
        if not is_sm90(t.device):
            return "GPU without TMA (needs compute capability >= 9.0)"
    elif not interpreting():
        return f"tensors on {t.device}"
    return None


def pdl_mode(device: torch.device, rows: int = 0) -> int:
    """The PDL mode for a kernel over ``rows`` rows (tokens) on ``device``: :data:`PDL_OFF` unless it is a CUDA
    device of compute capability >= 9.0 running compiled kernels (not ``TRITON_INTERPRET=1``, whose interpreter has
    no grid dependency control) with a Triton that has it; else ``TRIMFORMER_PDL`` (read on every call, so a process
    can A/B it): ``0``/``off``, ``late``, ``early``, or by default :data:`PDL_DEFAULT` up to :data:`PDL_MAX_ROWS`."""
    if device.type != "cuda" or interpreting() or not _HAS_GDC:
        return PDL_OFF
    env = os.environ.get("TRIMFORMER_PDL", "1").strip().lower()
    mode = _PDL_ENV.get(env, PDL_DEFAULT if rows <= PDL_MAX_ROWS else PDL_OFF)
    if mode == PDL_OFF:
        return PDL_OFF
    return mode if is_sm90(device) else PDL_OFF


def pdl_enabled(device: torch.device, rows: int = 0) -> bool:
    """Whether a kernel over ``rows`` rows on ``device`` launches with programmatic dependent launch."""
    return pdl_mode(device, rows) != PDL_OFF


def pdl_launch(device: torch.device, rows: int = 0) -> dict:
    """Launch keywords of a PDL-capable kernel over ``rows`` rows: its ``PDL`` constexpr (:func:`pdl_mode`) and the
    matching ``launch_pdl`` flag, so the two never disagree."""
    mode = pdl_mode(device, rows)
    return {"PDL": mode, "launch_pdl": mode != PDL_OFF}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """A PDL kernel's wait for the previous kernel (its writes are visible after it); in :data:`PDL_EARLY` mode the
    next kernel may launch from here on. Nothing is compiled when ``PDL`` is 0."""
    if PDL != 0:
        gdc_wait()
        if PDL == 2:
            gdc_launch_dependents()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """In :data:`PDL_LATE` mode, let the next kernel launch (call after the main loop, before the epilogue)."""
    if PDL == 1:
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Ask the copy engine to pull ``nbytes`` (a multiple of 16) from each 16-byte aligned address in ``ptrs`` into
    L2 (``cp.async.bulk.prefetch.L2``, sm_90; asynchronous, no registers or shared memory, never faults the kernel's
    ordering). For constant operands (weights) before :func:`gdc_wait`: their read then overlaps the previous kernel.
    Compiled only behind a ``PDL`` flag (the interpreter cannot run inline PTX)."""
    sizes = tl.full(ptrs.shape, nbytes, tl.int32)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r", [ptrs, sizes], dtype=tl.int32,
        is_pure=False, pack=1,
    )  # fmt: skip
