"""Split-K Triton GEMM without epilogue: ``[S, M, N]`` fp32 partial products (deterministic, no atomics).

For small ``M`` the output-tile grid of ``x @ W^T`` leaves most SMs idle (``M`` ~ 300, ``N`` = 768: ~60 tiles for
132 SMs, each looping over all of ``K``). Program ``(tile, s)`` computes K chunk ``s`` of whole ``block_k`` blocks
into ``P[s]``; the add + LayerNorm kernel (``ops/norm/layernorm.add_layer_norm_partials_fwd``) sums the chunks with
the bias and the residual, so no extra kernel is launched (``ops/linear/add_norm.py``). Tile order, K loop, PDL
prologue and TMA checks are shared with ``gemm.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.linear.gemm import (
    TensorDescriptor,
    _mma_pointers,
    _pdl_meta,
    _pdl_prologue,
    _tile_coords,
    tma_reason,
)
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting, num_sms, pdl_trigger


@dataclass(frozen=True)
class SplitKConfig:
    """Launch configuration of :func:`linear_partials_fwd`: output tiles of ``block_m x block_n``, ``K`` cut into
    ``splits`` chunks of whole ``block_k`` blocks (one program per (tile, chunk)); ``tma`` as in :class:`GemmConfig`.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    splits: int
    tma: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.splits <= MAX_SPLITS:
            raise ValueError(f"splits must be in 1..{MAX_SPLITS}, got {self}")


#: most K chunks a split-K GEMM may use (the reducing LayerNorm kernel unrolls a load per chunk).
MAX_SPLITS = 8


@functools.lru_cache(maxsize=256)
def default_split_k_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> SplitKConfig:
    """Shape-only split-K configuration: 64-row tiles (64 columns up to 128 rows, 128 above), enough K chunks
    (at least 4 blocks each) to give every SM about one program (H100 sweep: NOTES.md, round 4)."""
    if interpreting():
        return SplitKConfig(16, 32, 16, 4, 4, 1, splits=min(3, max(1, cdiv(k, 16))))
    bk = 32 if dtype == torch.float32 else 64
    bn = 64 if m <= 128 else 128
    tiles = cdiv(m, 64) * cdiv(n, bn)
    splits = max(1, min(MAX_SPLITS, sms // max(1, tiles), cdiv(k, 4 * bk)))
    return SplitKConfig(64, bn, bk, 8, 4, 4, splits, tma=dtype != torch.float32)


@triton.jit
def _store_partial(acc, P, off_m, off_n, M, N, stride_pm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Masked fp32 store of an ``[BM, BN]`` partial-product tile into one ``[M, N]`` slice of ``P``."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(P + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _linear_splitk_kernel(
    X,
    W,
    P,
    M,
    N,
    K,
    K_CHUNK,
    stride_xm,
    stride_wn,
    stride_ps,
    stride_pm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    PDL: tl.constexpr = 0,
    PREFETCH: tl.constexpr = False,
):
    """Split-K through pointers: program ``(tile, s)`` writes ``x[:, kc] @ W[:, kc]^T`` for K chunk ``s`` (columns
    ``[s * K_CHUNK, (s + 1) * K_CHUNK)``) into ``P[s]``, fp32, no atomics (a later kernel sums the chunks).
    ``PDL`` / ``PREFETCH`` as in :func:`_linear_kernel` (the prefetch covers this program's chunk)."""
    s = tl.program_id(1)
    off_m, off_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k0 = s * K_CHUNK
    kc = tl.minimum(K_CHUNK, K - k0)
    _pdl_prologue(W, tl.program_id(0), M, N, stride_wn, k0, kc * ELEM_BYTES, BLOCK_M, BLOCK_N, GROUP_M, PDL,
                  PREFETCH)  # fmt: skip
    acc = _mma_pointers(X + k0, W + k0, off_m, off_n, M, N, kc, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K,
                        EVEN_K, DOT_PREC)  # fmt: skip
    pdl_trigger(PDL)
    _store_partial(acc, P + s.to(tl.int64) * stride_ps, off_m, off_n, M, N, stride_pm, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M"])
def _linear_splitk_tma_kernel(
    x_desc,
    w_desc,
    P,
    W,
    M,
    N,
    K,
    K_CHUNK,
    stride_wn,
    stride_ps,
    stride_pm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    PDL: tl.constexpr = 0,
    PREFETCH: tl.constexpr = False,
):
    """:func:`_linear_splitk_kernel` with the operand tiles loaded by TMA (ragged edges read as zeros; chunks are
    whole ``BLOCK_K`` blocks, so no block straddles two chunks); ``W`` is only read by the L2 prefetch."""
    s = tl.program_id(1)
    off_m, off_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k0 = s * K_CHUNK
    kc = tl.minimum(K_CHUNK, K - k0)
    _pdl_prologue(W, tl.program_id(0), M, N, stride_wn, k0, kc * ELEM_BYTES, BLOCK_M, BLOCK_N, GROUP_M, PDL,
                  PREFETCH)  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(k0, k0 + kc, BLOCK_K):
        a = x_desc.load([off_m, kk])
        b = w_desc.load([off_n, kk])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PREC)
    pdl_trigger(PDL)
    _store_partial(acc, P + s.to(tl.int64) * stride_ps, off_m, off_n, M, N, stride_pm, BLOCK_M, BLOCK_N)


def linear_partials_fwd(x: torch.Tensor, weight: torch.Tensor, config: SplitKConfig | None = None) -> torch.Tensor:
    """Split-K GEMM without epilogue: fp32 partial products, deterministic (no atomics).

    Args:
        x: ``[M, K]`` fp16/bf16/fp32 (unit stride on ``K``; copied otherwise).
        weight: ``[N, K]`` in ``x``'s dtype.
        config: default :func:`default_split_k_config`. The chunk count actually used is at most the number of
            ``block_k`` blocks in ``K`` and never leaves a chunk empty.

    Returns:
        ``[S, M, N]`` fp32 with ``sum(S) == x @ weight^T`` (``S`` <= ``config.splits``).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or default_split_k_config(m, n, k, x.dtype, num_sms(x.device))
    blocks = cdiv(k, cfg.block_k)
    chunk = cdiv(blocks, min(cfg.splits, blocks)) * cfg.block_k
    splits = cdiv(k, chunk)
    parts = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    if m == 0:
        return parts
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), splits)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                DOT_PREC=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **_pdl_meta(x, weight))  # fmt: skip
    if cfg.tma and tma_reason(x, weight, x) is None:  # the partials are stored through pointers
        bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
        x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk])
        w_desc = TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [bn, bk])
        _linear_splitk_tma_kernel[grid](x_desc, w_desc, parts, weight, m, n, k, chunk, weight.stride(0), m * n, n,
                                        **meta)  # fmt: skip
    else:
        _linear_splitk_kernel[grid](
            x, weight, parts, m, n, k, chunk, x.stride(0), weight.stride(0), m * n, n,
            EVEN_K=k % cfg.block_k == 0, **meta,
        )  # fmt: skip
    return parts


__all__ = ["MAX_SPLITS", "SplitKConfig", "default_split_k_config", "linear_partials_fwd"]
