"""Triton GEMM ``y = act(x @ W^T + b)`` with the bias and the activation applied to the fp32 accumulator.

Fusing the epilogue saves one write and one read of the ``[M, N]`` output (for BERT's first FFN GEMM that is
``2 * T * 4H * 2`` bytes per layer, as much traffic as the GEMM's own operands at ``T`` = a few thousand tokens).
Tiles are assigned in ``GROUP_M``-row groups so consecutive programs share ``W`` tiles in L2 (Triton's matmul
tutorial). ``W`` is read in its ``nn.Linear`` layout ``[N, K]`` (``K`` contiguous); ``x`` rows may have any stride
with a contiguous last dimension. Accumulation is fp32 (``tl.dot`` on tensor cores for fp16/bf16; exact fp32 products
for fp32 inputs). No host syncs; the launch configuration depends on the shape only (graph-capturable, no autotune).

Two kernels share the tile order, the K loop pieces and the epilogue (``@triton.jit`` helpers below):

* ``_linear_kernel`` reads its tiles through pointers (any GPU, and the CPU interpreter);
* ``_linear_tma_kernel`` reads and writes them through tensor descriptors (Hopper's TMA copy engine: no address
  arithmetic or masks in the K loop, out-of-bounds rows read as zeros and are clipped on store), optionally with the
  epilogue stored as two ``BLOCK_N / 2`` halves (fewer registers and staging bytes live at once).

Both run either one program per output tile or persistently (``GemmConfig.persistent``: ``ctas_per_sm`` programs
per SM loop over the tiles with ``tl.range(..., flatten=True)``, so the next tile's loads are issued during a tile's
epilogue). Which configuration wins is measured per shape on the GPU (``tune.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.activation.fused import ACT_CODES, apply_activation
from trimformer.ops.triton_utils import (
    TensorDescriptor,
    cdiv,
    dot_precision,
    dtype_reason,
    interpreting,
    next_power_of_2,
    num_sms,
    pdl_launch,
    pdl_trigger,
    pdl_wait,
    prefetch_l2,
    tma_device_reason,
)


@dataclass(frozen=True)
class GemmConfig:
    """Launch configuration of :func:`linear_fwd`.

    ``tma`` selects the tensor-descriptor kernel (fp16/bf16 on sm_90+ or the interpreter, 16-byte aligned rows;
    :func:`linear_fwd` falls back to the pointer kernel with the same tiles otherwise), ``split`` (1 or 2) stores the
    epilogue in that many ``BLOCK_N / split`` column slices, ``ctas_per_sm`` sizes the persistent grid.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    persistent: bool = False
    tma: bool = False
    split: int = 1
    ctas_per_sm: int = 1

    def __post_init__(self) -> None:
        if self.split not in (1, 2) or self.block_n % (8 * self.split):
            raise ValueError(f"split must be 1 or 2 and divide block_n into multiples of 8, got {self}")
        if self.ctas_per_sm < 1:
            raise ValueError(f"ctas_per_sm must be >= 1, got {self.ctas_per_sm}")


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, kind: str) -> str | None:
    """Why the Triton GEMM cannot take these inputs, or ``None`` when it can."""
    reason = dtype_reason(x)
    if reason is not None:
        return reason
    if kind not in ACT_CODES:
        return f"activation {kind!r}"
    if weight.shape[1] == 0 or weight.shape[0] == 0:
        return f"empty weight {tuple(weight.shape)}"
    return None


#: under PDL, each program's weight rows are prefetched into L2 before it waits for the previous kernel (the sweep
#: in NOTES.md, round 5, switches it off for A/B measurements).
PREFETCH_WEIGHTS = {"enabled": True}


def _pdl_meta(x: torch.Tensor, weight: torch.Tensor) -> dict:
    """Launch options for programmatic dependent launch (``triton_utils.pdl_enabled``) and the weight prefetch
    (16-byte aligned weight rows of whole 16-byte multiples only)."""
    size = weight.element_size()
    pdl = pdl_launch(x.device, x.shape[0])
    prefetch = (
        pdl["launch_pdl"]
        and PREFETCH_WEIGHTS["enabled"]
        and weight.data_ptr() % 16 == 0
        and (weight.stride(0) * size) % 16 == 0
        and (weight.shape[1] * size) % 16 == 0
    )
    return dict(PREFETCH=prefetch, ELEM_BYTES=size, **pdl)


def tma_reason(x2: torch.Tensor, weight: torch.Tensor, y2: torch.Tensor) -> str | None:
    """Why the tensor-descriptor kernel cannot run ``[M, K] x [N, K]^T -> [M, N]`` on these 2-D views, or ``None``.

    Needs triton's host descriptors, fp16/bf16, a Hopper (sm_90+) GPU or the CPU interpreter, and 16-byte aligned base
    pointers and row strides (``K`` and ``N`` multiples of 8 for contiguous tensors).
    """
    reason = tma_device_reason(x2)
    if reason is not None:
        return reason
    size = x2.element_size()
    for name, t in (("x", x2), ("weight", weight), ("y", y2)):
        if t.data_ptr() % 16 or (t.stride(0) * size) % 16 or t.stride(1) != 1:
            return f"{name} is not 16-byte aligned (pointer {t.data_ptr()}, strides {tuple(t.stride())})"
    return None


@functools.lru_cache(maxsize=512)
def default_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> GemmConfig:
    """Shape-only launch configuration (see NOTES.md for the H100 measurements behind it)."""
    if interpreting():
        return GemmConfig(32, 32, 32, 4, 4, 1)
    wide = dtype == torch.float32
    if m <= 64:  # a few rows: narrow tiles so that many programs share the weight read
        bm = max(16, next_power_of_2(m))
        return GemmConfig(bm, 64, 64 if wide else 128, 1, 4, 4)
    if m <= 512:
        return GemmConfig(64, 64 if cdiv(m, 64) * cdiv(n, 128) < sms else 128, 64, 8, 4, 4)
    if wide:
        return GemmConfig(128, 64, 32, 8, 4, 3)
    if cdiv(m, 128) * cdiv(n, 256) >= 2 * sms:  # epilogue in two halves: 128x256 in one piece spills registers
        return GemmConfig(128, 256, 64, 8, 8, 3, tma=True, split=2)
    return GemmConfig(128, 128, 64, 8, 4, 3, tma=True, split=2)


# ------------------------------------------------------------------------------------------ shared jit pieces


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of output tile ``tile`` in grouped order (``GROUP_M`` row tiles share each column)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_size
    pid_n = (tile % width) // group_size
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _mma_pointers(
    X,
    W,
    off_m,
    off_n,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """fp32 ``[BLOCK_M, BLOCK_N]`` tile of ``x @ W^T`` at (off_m, off_n), operands loaded through pointers.

    Rows past ``M`` / ``N`` wrap around (their products land in rows and columns the store masks off), so only a
    ragged ``K`` needs masks.
    """
    rm = (off_m + tl.arange(0, BLOCK_M)) % M
    rn = (off_n + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    x_base = X + rm.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_base = W + rn.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_base + kb * BLOCK_K)
            b = tl.load(w_base + kb * BLOCK_K)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(x_base + kb * BLOCK_K, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_base + kb * BLOCK_K, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _mma_descriptors(x_desc, w_desc, off_m, off_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """:func:`_mma_pointers` through TMA descriptors (``x``: ``[M, K]`` blocks ``[BM, BK]``, ``W``: ``[N, K]``
    blocks ``[BN, BK]``); out-of-bounds elements (ragged ``M``, ``N``, ``K``) are read as zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, kb * BLOCK_K])
        b = w_desc.load([off_n, kb * BLOCK_K])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _bias_act(acc, B, off_n, N, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, WIDTH: tl.constexpr):
    """``act(acc + bias[off_n : off_n + WIDTH])`` on an fp32 ``[rows, WIDTH]`` tile."""
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, WIDTH)
        acc += tl.load(B + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return apply_activation(acc, ACT)


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split an ``[BM, BN]`` tile into its left and right ``[BM, BN / 2]`` halves."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _store_pointers(acc, B, Y, off_m, off_n, M, N, stride_ym, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """Epilogue of a ``[BM, WIDTH]`` slice: bias, activation, masked store in ``Y``'s dtype."""
    out = _bias_act(acc, B, off_n, N, HAS_BIAS, ACT, WIDTH).to(Y.dtype.element_ty)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, WIDTH)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], out, mask=mask)


@triton.jit
def _prefetch_weight(W, off_m, off_n, N, stride_wn, k0, nbytes, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr):  # fmt: skip
    """L2 prefetch of the ``BLOCK_N`` weight rows of the column tile at ``off_n`` (``nbytes`` each from column
    ``k0``), issued by the first row tile of each ``GROUP_M`` group only (the others share those rows in L2)."""
    if (off_m // BLOCK_M) % GROUP_M == 0:
        rows = tl.minimum(off_n + tl.arange(0, BLOCK_N), N - 1)
        prefetch_l2(W + rows.to(tl.int64) * stride_wn + k0, nbytes)


@triton.jit
def _pdl_prologue(W, tile, M, N, stride_wn, k0, nbytes, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """Under PDL: prefetch the (constant) weight rows of ``tile`` into L2 while the previous kernel drains, then wait
    for it (every program, before any read of ``x`` or any store)."""
    if PREFETCH:
        off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _prefetch_weight(W, off_m, off_n, N, stride_wn, k0, nbytes, BLOCK_M, BLOCK_N, GROUP_M)
    pdl_wait(PDL)


@triton.jit
def _pointer_tile(X, W, B, Y, tile, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                  ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
                  PDL: tl.constexpr):  # fmt: skip
    off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _mma_pointers(X, W, off_m, off_n, M, N, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
                        DOT_PREC)  # fmt: skip
    pdl_trigger(PDL)  # the next kernel may start launching while this epilogue runs (it waits for our stores)
    if SPLIT == 2:
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        _store_pointers(left, B, Y, off_m, off_n, M, N, stride_ym, HAS_BIAS, ACT, BLOCK_M, BLOCK_N // 2)
        _store_pointers(right, B, Y, off_m, off_n + BLOCK_N // 2, M, N, stride_ym, HAS_BIAS, ACT, BLOCK_M,
                        BLOCK_N // 2)  # fmt: skip
    else:
        _store_pointers(acc, B, Y, off_m, off_n, M, N, stride_ym, HAS_BIAS, ACT, BLOCK_M, BLOCK_N)


@triton.jit
def _descriptor_tile(x_desc, w_desc, y_desc, B, tile, M, N, K, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _mma_descriptors(x_desc, w_desc, off_m, off_n, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PREC)
    pdl_trigger(PDL)
    dtype = y_desc.dtype
    if SPLIT == 2:
        left, right = _halves(acc, BLOCK_M, BLOCK_N)
        y_desc.store([off_m, off_n], _bias_act(left, B, off_n, N, HAS_BIAS, ACT, BLOCK_N // 2).to(dtype))
        half = off_n + BLOCK_N // 2
        y_desc.store([off_m, half], _bias_act(right, B, half, N, HAS_BIAS, ACT, BLOCK_N // 2).to(dtype))
    else:
        y_desc.store([off_m, off_n], _bias_act(acc, B, off_n, N, HAS_BIAS, ACT, BLOCK_N).to(dtype))


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit(do_not_specialize=["M"])  # one compile for any token count (the tuner times several configs)
def _linear_kernel(
    X,
    W,
    B,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    NUM_PROGRAMS,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    PERSISTENT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr = 0,
    PREFETCH: tl.constexpr = False,
):
    """Pointer-based GEMM: one program per output tile, or (``PERSISTENT``) ``NUM_PROGRAMS`` programs striding
    over the tiles (``flatten`` lets the software pipeline cross tile boundaries). ``PDL``: launched with
    programmatic dependent launch (``triton_utils``); ``PREFETCH``: the first tile's weight rows go to L2 before
    the wait (``K`` row bytes, 16-byte aligned)."""
    _pdl_prologue(W, tl.program_id(0), M, N, stride_wn, 0, K * ELEM_BYTES, BLOCK_M, BLOCK_N, GROUP_M, PDL, PREFETCH)
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
            _pointer_tile(X, W, B, Y, tile, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS, ACT, BLOCK_M,
                          BLOCK_N, BLOCK_K, GROUP_M, SPLIT, EVEN_K, DOT_PREC, PDL)  # fmt: skip
    else:
        _pointer_tile(X, W, B, Y, tl.program_id(0), M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS, ACT,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, EVEN_K, DOT_PREC, PDL)  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _linear_tma_kernel(
    x_desc,
    w_desc,
    y_desc,
    B,
    W,
    M,
    N,
    K,
    stride_wn,
    NUM_PROGRAMS,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr,
    ELEM_BYTES: tl.constexpr,
    PERSISTENT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    PDL: tl.constexpr = 0,
    PREFETCH: tl.constexpr = False,
):
    """:func:`_linear_kernel` with tiles moved by TMA descriptors (loads and the epilogue's store); ``W`` (the
    weight's base pointer, row stride ``stride_wn``) is only read by the L2 prefetch."""
    _pdl_prologue(W, tl.program_id(0), M, N, stride_wn, 0, K * ELEM_BYTES, BLOCK_M, BLOCK_N, GROUP_M, PDL, PREFETCH)
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
            _descriptor_tile(x_desc, w_desc, y_desc, B, tile, M, N, K, HAS_BIAS, ACT, BLOCK_M, BLOCK_N, BLOCK_K,
                             GROUP_M, SPLIT, DOT_PREC, PDL)  # fmt: skip
    else:
        _descriptor_tile(x_desc, w_desc, y_desc, B, tl.program_id(0), M, N, K, HAS_BIAS, ACT, BLOCK_M, BLOCK_N,
                         BLOCK_K, GROUP_M, SPLIT, DOT_PREC, PDL)  # fmt: skip


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    *,
    config: GemmConfig | object | None = None,
) -> torch.Tensor:
    """Launch the GEMM; inputs are assumed validated by ``api.py``.

    Args:
        x: ``[..., K]`` fp16/bf16/fp32 (last dim contiguous; copied otherwise).
        weight: ``[N, K]`` in ``x``'s dtype, ``K`` contiguous.
        bias: ``[N]`` or ``None``.
        kind: canonical activation kind (``"identity"`` for none).
        config: launch configuration override (tuner, benchmarks); default :func:`default_config`. A ``tma`` config
            that :func:`tma_reason` rejects for these tensors runs the pointer kernel with the same tiles; a
            ``gemm_ws.WsGemmConfig`` runs the warp-specialised Hopper kernel (``gemm_ws.py``; sm_90 GPUs only).

    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if config is not None and not isinstance(config, GemmConfig):
        from trimformer.ops.linear import gemm_ws

        reason = gemm_ws.ws_reason(x2, weight, kind)
        if reason is not None:
            raise ValueError(f"the warp-specialised GEMM cannot run this input: {reason}")
        return gemm_ws.ws_linear_fwd(x2, weight, bias, kind, config=config).view(*x.shape[:-1], n)
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    y2 = y.view(m, n)
    cfg = config or default_config(m, n, k, x.dtype, num_sms(x.device))
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    programs = min(tiles, num_sms(x.device) * cfg.ctas_per_sm) if cfg.persistent else tiles
    bias_arg = bias if bias is not None else weight
    meta = dict(
        HAS_BIAS=bias is not None, ACT=ACT_CODES[kind], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT=cfg.split, PERSISTENT=cfg.persistent,
        DOT_PREC=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl_meta(x2, weight),
    )  # fmt: skip
    if cfg.tma and tma_reason(x2, weight, y2) is None:
        bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
        descs = (
            TensorDescriptor(x2, [m, k], [x2.stride(0), 1], [bm, bk]),
            TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [bn, bk]),
            TensorDescriptor(y2, [m, n], [n, 1], [bm, bn // cfg.split]),
        )
        _linear_tma_kernel[(programs,)](*descs, bias_arg, weight, m, n, k, weight.stride(0), programs, **meta)
    else:
        _linear_kernel[(programs,)](
            x2, weight, bias_arg, y2, m, n, k, x2.stride(0), weight.stride(0), n, programs,
            EVEN_K=k % cfg.block_k == 0, **meta,
        )  # fmt: skip
    return y


__all__ = [
    "PREFETCH_WEIGHTS",
    "GemmConfig",
    "default_config",
    "linear_fwd",
    "tma_reason",
    "unsupported_reason",
]
