"""Triton GEMM ``y = act(x @ W^T + b)`` with the bias and the activation applied to the fp32 accumulator.

Fusing the epilogue saves one write and one read of the ``[M, N]`` output (for BERT's first FFN GEMM that is
``2 * T * 4H * 2`` bytes per layer, as much traffic as the GEMM's own operands at ``T`` = a few thousand tokens).
Tiles are assigned in ``GROUP_M``-row groups so consecutive programs share ``W`` tiles in L2 (Triton's matmul
tutorial). ``W`` is read in its ``nn.Linear`` layout ``[N, K]`` (``K`` contiguous); ``x`` rows may have any stride
with a contiguous last dimension. Accumulation is fp32 (``tl.dot`` on tensor cores for fp16/bf16; exact fp32 products
for fp32 inputs). No host syncs; the launch configuration depends on the shape only (graph-capturable, no autotune).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trimformer.ops.activation.fused import ACT_CODES, apply_activation
from trimformer.ops.triton_utils import cdiv, dot_precision, interpreting, next_power_of_2, num_sms


@dataclass(frozen=True)
class GemmConfig:
    """Launch configuration of :func:`linear_fwd`."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    persistent: bool = False


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, kind: str) -> str | None:
    """Why the Triton GEMM cannot take these inputs, or ``None`` when it can."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (supported: float16, bfloat16, float32)"
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return "bfloat16 under the Triton CPU interpreter (its bf16 arithmetic is broken)"
    if kind not in ACT_CODES:
        return f"activation {kind!r}"
    if weight.shape[1] == 0 or weight.shape[0] == 0:
        return f"empty weight {tuple(weight.shape)}"
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
    if cdiv(m, 128) * cdiv(n, 256) >= 2 * sms:
        return GemmConfig(128, 256, 64, 8, 8, 3)
    return GemmConfig(128, 128, 64, 8, 8, 3)


@triton.jit
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
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % group_size)
    pid_n = (pid % width) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped rows: the loads need no row mask (the store is masked)
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = W + rn.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = apply_activation(acc, ACT)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _linear_persistent_kernel(
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
    EVEN_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """:func:`_linear_kernel` with one program per SM looping over the output tiles (grouped order), so one tile's
    epilogue overlaps the next tile's loads (``flatten`` lets the software pipeline cross tile boundaries)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    width = GROUP_M * grid_n
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGRAMS, flatten=True):
        group_id = tile // width
        first_m = group_id * GROUP_M
        group_size = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + ((tile % width) % group_size)
        pid_n = (tile % width) // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        rn = offs_n % N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, k_tiles):
            x_ptrs = X + rm.to(tl.int64)[:, None] * stride_xm + (kb * BLOCK_K + offs_k)[None, :]
            w_ptrs = W + rn.to(tl.int64)[None, :] * stride_wn + (kb * BLOCK_K + offs_k)[:, None]
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_ok = offs_k < K - kb * BLOCK_K
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        n_ok = offs_n < N
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = apply_activation(acc, ACT)
        y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


def linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Launch the GEMM; inputs are assumed validated by ``api.py``.

    Args:
        x: ``[..., K]`` fp16/bf16/fp32 (last dim contiguous; copied otherwise).
        weight: ``[N, K]`` in ``x``'s dtype, ``K`` contiguous.
        bias: ``[N]`` or ``None``.
        kind: canonical activation kind (``"identity"`` for none).
        config: launch configuration override (benchmarks); default :func:`default_config`.

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
    m = x2.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    cfg = config or default_config(m, n, k, x.dtype, num_sms(x.device))
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    args = (x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), n)
    if cfg.persistent:
        programs = min(tiles, num_sms(x.device))
        kernel, grid, args = _linear_persistent_kernel, (programs,), (*args, programs)
    else:
        kernel, grid = _linear_kernel, (tiles,)
    kernel[grid](
        *args,
        HAS_BIAS=bias is not None, ACT=ACT_CODES[kind], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, EVEN_K=k % cfg.block_k == 0, DOT_PREC=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


__all__ = ["GemmConfig", "default_config", "linear_fwd", "unsupported_reason"]
