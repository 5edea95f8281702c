"""Warp-specialised Hopper GEMM ``y = act(x @ W^T + b)`` (Gluon): the epilogue of one tile runs while the tensor
cores work on the next.

Why: with ``tl`` on sm_90 (Triton 3.6) a program's epilogue (bias, erf GELU: ~17 instructions per element, the
stores) runs after its K loop and before the next tile's, so the tensor cores idle for it: BERT's FFN1 GEMM with
the GELU epilogue ran at ~440 TFLOP/s against cuBLAS's ~575 without one (``NOTES.md``, rounds 3 and 6).

One persistent program per SM, ``gl.warp_specialize`` partitions:

* a loader warp: per pipeline stage, TMA copies of the two ``BLOCK_M / 2``-row halves of the ``x`` tile and the
  ``W`` tile they share (``STAGES`` stages, ``ready``/``empty`` mbarriers);
* two MMA warpgroups, one per row half (the CUTLASS "cooperative" split: a ``BLOCK_M x BLOCK_N`` tile per program
  with one ``W`` read, so L2 traffic stays at a 256 x 128 tile's): wgmma with one group in flight, a stage released
  as soon as the wgmma reading it retires; at the end of the K loop the accumulator, rounded to the output dtype, goes
  to a shared-memory buffer (``c_full``/``c_empty`` mbarriers) and the warpgroup starts the next tile;
* the epilogue warpgroup (the default partition): bias + activation in fp32 on those values and coalesced masked
  stores, overlapping the next tile's K loop.

Numerics: fp32 accumulation; the bias and the activation apply to the accumulator rounded once to the output dtype,
as cuBLAS followed by the fused bias-activation kernel computes them. TMA reads zeros outside ``x`` and ``W``, so
ragged ``M``, ``N`` and ``K`` need no masks in the K loop. Tiles are visited in grouped order (``GROUP_M`` row tiles
share a column of ``W`` in L2). Requires a Hopper GPU (sm_90: wgmma, TMA, mbarriers, ``setmaxnreg``; Gluon has no
CPU interpreter). Forward only; configuration by shape only; no host syncs (graph-capturable).

Status (H100, NOTES.md round 7): correct, but not faster than what ``linear(impl="auto")`` already picks at the BERT
shapes (FFN1 + GELU at 4772 rows: 53.2 us against the ``tl`` persistent kernel's 51.2; identity GEMMs 5-30% behind
cuBLAS), so the tuner does not time it; ``gemm.linear_fwd(..., config=WsGemmConfig())`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

from trimformer.ops.activation.fused import ACT_CODES, apply_activation
from trimformer.ops.linear.gemm import _tile_coords  # @triton.jit helpers are callable from Gluon kernels
from trimformer.ops.triton_utils import cdiv, num_sms, tma_device_reason

#: the TMA load builtin (``async_copy_global_to_shared`` in Triton 3.6, renamed ``async_load`` later)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


#: shared memory one program may use on sm_90 (227 KB), less what the mbarriers and the compiler take
SMEM_LIMIT = 232448 - 1024


@dataclass(frozen=True)
class WsGemmConfig:
    """Launch configuration of :func:`ws_linear_fwd`: output tile ``block_m x block_n`` per program (each MMA
    warpgroup computes ``block_m / 2`` rows of it), ``block_k`` per pipeline stage, ``stages`` stages, ``group_m``
    row tiles per column group of the tile order."""

    block_m: int = 256
    block_n: int = 128
    block_k: int = 64
    stages: int = 3
    group_m: int = 8

    def __post_init__(self) -> None:
        if self.block_m not in (128, 256) or self.block_n not in (64, 128) or self.block_k not in (32, 64, 128):
            raise ValueError(f"unsupported tile {self} (block_m 128/256, block_n 64/128, block_k 32/64/128)")
        if not 2 <= self.stages <= 6 or self.group_m < 1:
            raise ValueError(f"stages must be in [2, 6] and group_m >= 1, got {self}")
        if self.smem_bytes() > SMEM_LIMIT:
            raise ValueError(f"{self} needs {self.smem_bytes()} bytes of shared memory (sm_90 allows {SMEM_LIMIT})")

    def smem_bytes(self, elem_bytes: int = 2) -> int:
        """Shared memory of the operand ring and the epilogue hand-over buffer."""
        return (self.stages * (self.block_m + self.block_n) * self.block_k + self.block_m * self.block_n) * elem_bytes


#: registers per thread of the worker partitions (``setmaxnreg``): an MMA warpgroup holds a 128 x 128 fp32
#: accumulator (128 registers per thread); the loader only issues TMA copies; the epilogue warpgroup (the default
#: partition) gets what is left of the launch budget.
_MMA_REGS = gl.constexpr(176)
_LOADER_REGS = gl.constexpr(24)
#: launch-time register cap: 16 warps (4 warpgroups) x 32 threads x 128 = 65536.
_MAXNREG = 128


@gluon.jit
def _loader(x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr):
    """TMA copies: per stage the two 128-row halves of the ``x`` tile and the ``W`` tile they share."""
    HALF_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = b_bufs.type.shape[0]
    tiles = gl.cdiv(M, 2 * HALF_M) * gl.cdiv(N, BLOCK_N)
    it = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_m, off_n = _tile_coords(tile, M, N, 2 * HALF_M, BLOCK_N, GROUP_M)
        for k in range(0, K, BLOCK_K):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, 2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(x_desc, [off_m, k], bar, a_bufs.index(2 * s))
            _tma_load(x_desc, [off_m + HALF_M, k], bar, a_bufs.index(2 * s + 1))
            _tma_load(w_desc, [off_n, k], bar, b_bufs.index(s))
            it += 1


@gluon.jit
def _mma(a_bufs, b_bufs, c_bufs, ready, empty, c_full, c_empty, M, N, K, HALF: gl.constexpr, GROUP_M: gl.constexpr):
    """One warpgroup's half (rows ``HALF * 128 ..``) of each tile: wgmma over the stages (one in flight), then the
    accumulator rounded to the output dtype into ``c_bufs[HALF]`` for the epilogue warpgroup."""
    HALF_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    STAGES: gl.constexpr = b_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    tiles = gl.cdiv(M, 2 * HALF_M) * gl.cdiv(N, BLOCK_N)
    c_buf = c_bufs.index(HALF)
    it = 0
    t = 0
    for _ in range(gl.program_id(0), tiles, gl.num_programs(0)):
        acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
        prev = 0
        for k in range(0, K, BLOCK_K):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(2 * s + HALF), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index(prev), count=1, pred=k > 0)  # the previous stage's wgmma has retired
            prev = s
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(prev), count=1)
        mbarrier.wait(c_empty.index(HALF), (t & 1) ^ 1)  # the epilogue has read the previous tile
        c_buf.store(acc.to(c_buf.dtype))
        mbarrier.arrive(c_full.index(HALF), count=1)
        t += 1


@gluon.jit
def _epilogue(c_bufs, c_full, c_empty, bias_ptr, y_ptr, M, N, stride_y, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
              GROUP_M: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """Bias + activation + coalesced masked stores of the tiles the MMA warpgroups hand over, column chunk by
    column chunk, while they already run the next tile's K loop."""
    HALF_M: gl.constexpr = c_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = c_bufs.type.shape[2]
    CHUNK: gl.constexpr = 32 if BLOCK_N >= 32 else BLOCK_N
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (CHUNK // 8), CHUNK // 8], [num_warps, 1], [1, 0])
    tiles = gl.cdiv(M, 2 * HALF_M) * gl.cdiv(N, BLOCK_N)
    t = 0
    for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
        off_m, off_n = _tile_coords(tile, M, N, 2 * HALF_M, BLOCK_N, GROUP_M)
        for half in gl.static_range(2):
            mbarrier.wait(c_full.index(half), t & 1)
            c_buf = c_bufs.index(half)
            rows = off_m + half * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, layout))
            row_ok = (rows < M)[:, None]
            base = y_ptr + rows.to(gl.int64)[:, None] * stride_y
            for c0 in gl.static_range(0, BLOCK_N, CHUNK):
                h = c_buf.slice(c0, CHUNK, dim=1).load(layout).to(gl.float32)
                cols = off_n + c0 + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
                col_ok = cols < N
                if HAS_BIAS:
                    h = h + gl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(gl.float32)[None, :]
                h = apply_activation(h, ACT)
                gl.store(base + cols[None, :], h.to(y_ptr.dtype.element_ty), mask=row_ok & col_ok[None, :])
            mbarrier.arrive(c_empty.index(half), count=1)
        t += 1


@gluon.jit
def _ws_linear_kernel(x_desc, w_desc, bias_ptr, y_ptr, M, N, K, stride_y, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
                      STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    HALF_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, HALF_M, BLOCK_K], x_desc.layout)
    b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    c_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF_M, BLOCK_N], x_desc.dtype)
    c_bufs = gl.allocate_shared_memory(x_desc.dtype, [2, HALF_M, BLOCK_N], c_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    c_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    c_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)  # released by both MMA warpgroups
    for h in gl.static_range(2):
        mbarrier.init(c_full.index(h), count=1)
        mbarrier.init(c_empty.index(h), count=1)
    FIRST: gl.constexpr = 0
    SECOND: gl.constexpr = 1
    gl.warp_specialize(
        [
            (_epilogue, (c_bufs, c_full, c_empty, bias_ptr, y_ptr, M, N, stride_y, HAS_BIAS, ACT, GROUP_M,
                         num_warps)),
            (_mma, (a_bufs, b_bufs, c_bufs, ready, empty, c_full, c_empty, M, N, K, FIRST, GROUP_M)),
            (_mma, (a_bufs, b_bufs, c_bufs, ready, empty, c_full, c_empty, M, N, K, SECOND, GROUP_M)),
            (_loader, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M)),
        ],
        [4, 4, 1],
        [_MMA_REGS, _MMA_REGS, _LOADER_REGS],
    )  # fmt: skip


def ws_reason(x2: torch.Tensor, weight: torch.Tensor, kind: str) -> str | None:
    """Why :func:`ws_linear_fwd` cannot take ``x2 [M, K]`` and ``weight [N, K]``, or ``None``: CUDA fp16/bf16 on an
    sm_90+ GPU, 16-byte aligned rows (``K`` a multiple of 8), a known activation."""
    if not x2.is_cuda:
        return f"tensors on {x2.device} (the warp-specialised GEMM is a Gluon kernel: needs an sm_90 GPU)"
    reason = tma_device_reason(x2)
    if reason is not None:
        return reason
    if kind not in ACT_CODES:
        return f"activation {kind!r}"
    size = x2.element_size()
    for name, t in (("x", x2), ("weight", weight)):
        if t.data_ptr() % 16 or (t.stride(0) * size) % 16 or t.stride(-1) != 1:
            return f"{name} is not 16-byte aligned (pointer {t.data_ptr()}, strides {tuple(t.stride())})"
    return None


def ws_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, *, config: WsGemmConfig | None = None
) -> torch.Tensor:
    """Launch the warp-specialised GEMM (inputs validated by the caller; see :func:`ws_reason`).

    Args:
        x: ``[..., K]`` fp16/bf16 CUDA tensor, last dim contiguous.
        weight: ``[N, K]`` in ``x``'s dtype (``nn.Linear`` layout, ``K`` contiguous).
        bias: ``[N]`` or ``None``.
        kind: canonical activation kind (``"identity"`` for none; the keys of ``ACT_CODES``).
        config: tile configuration (default :class:`WsGemmConfig`).

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    cfg = config or WsGemmConfig()
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    el = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    a_layout = gl.NVMMASharedLayout.get_default_for([bm // 2, bk], el)
    b_layout = gl.NVMMASharedLayout.get_default_for([bn, bk], el)
    x_desc = GluonDescriptor(x2, [m, k], [x2.stride(0), 1], [bm // 2, bk], a_layout)
    w_desc = GluonDescriptor(weight, [n, k], [weight.stride(0), 1], [bn, bk], b_layout)
    tiles = cdiv(m, bm) * cdiv(n, bn)
    programs = min(num_sms(x.device), tiles)
    _ws_linear_kernel[(programs,)](
        x_desc, w_desc, bias if bias is not None else weight, y, m, n, k, n, HAS_BIAS=bias is not None,
        ACT=ACT_CODES[kind], STAGES=cfg.stages, GROUP_M=cfg.group_m, num_warps=4, maxnreg=_MAXNREG,
    )  # fmt: skip
    return y


__all__ = ["WsGemmConfig", "ws_linear_fwd", "ws_reason"]
