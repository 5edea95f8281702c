"""Measured choice, per GEMM shape, between cuBLAS + the fused bias-activation kernel and the Triton GEMM with the
bias and activation in its epilogue (one of a few Hopper-sized launch configurations).

Which one wins depends on the shape and on the machine (NOTES.md: on the H100 the Triton GEMM lost to cuBLAS at some
BERT-base shapes and won at others), so ``linear(impl="auto")`` measures instead of guessing: the first time a CUDA
GEMM with an activation of a given ``(row bucket, N, K, activation, dtype, device)`` runs outside a CUDA-graph
capture, every candidate is timed on the real operands (CUDA events, median of a few calls, after one warm-up call
that also compiles it) and the fastest is remembered. The row bucket is the next power of two of ``M``, so a model
tunes each FFN shape once per power of two of its token count. The search synchronises the device, so it is skipped
(and cuBLAS + the fused kernel used, without remembering anything) while a stream is capturing, under
``torch.compile`` tracing, and when ``torch.cuda`` sync debugging is on. ``CUDA graphs`` capture after warm-up calls,
so captured graphs use the tuned choice. Call :func:`set_choice` to pin one, :func:`clear` to forget all.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from trimformer.ops.linear.gemm import GemmConfig, default_config, linear_fwd
from trimformer.ops.triton_utils import next_power_of_2, num_sms

#: ``None`` = cuBLAS + fused bias-activation kernel; a :class:`GemmConfig` = the Triton GEMM with that config.
Choice = GemmConfig | None
_CHOICES: dict[tuple, Choice] = {}
#: what the last searches measured, ``key -> {candidate name: ms}`` (benchmarks report it).
MEASURED: dict[tuple, dict[str, float]] = {}
_REPEAT = 7


def tune_key(m: int, n: int, k: int, kind: str, dtype: torch.dtype, device: torch.device) -> tuple:
    """Cache key of a GEMM ``[m, k] x [k, n]`` with activation ``kind``: ``m`` is bucketed to a power of two."""
    return (next_power_of_2(m), n, k, kind, dtype, device.index)


def candidate_configs(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> list[GemmConfig]:
    """Launch configurations worth timing for this shape (the shape-only default first, no duplicates)."""
    g = GemmConfig
    out = [default_config(m, n, k, dtype, sms)]
    if dtype == torch.float32:
        return out
    if m <= 512:
        out += [g(64, 64, 64, 8, 4, 4), g(64, 128, 64, 8, 4, 4), g(32, 64, 128, 1, 4, 4), g(32, 32, 128, 1, 4, 4)]
    else:
        out += [g(128, 256, 64, 8, 8, 3), g(128, 128, 64, 8, 8, 4), g(128, 128, 64, 8, 4, 4), g(64, 256, 64, 8, 8, 3),
                g(128, 256, 64, 8, 8, 3, True), g(128, 128, 64, 8, 8, 4, True)]  # fmt: skip
    seen: list[GemmConfig] = []
    for c in out:
        if c not in seen:
            seen.append(c)
    return seen


def can_search(x: torch.Tensor) -> bool:
    """Whether a search may run now (CUDA input, no capture, no compile tracing, no sync debugging)."""
    return (
        x.is_cuda
        and not torch.compiler.is_compiling()
        and not torch.cuda.is_current_stream_capturing()
        and torch.cuda.get_sync_debug_mode() == 0
    )


def _median_ms(fn: Callable[[], object]) -> float:
    fn()  # compile + warm
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(_REPEAT)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(_REPEAT)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def choose(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, cublas: Callable[[], object]
) -> Choice:
    """The remembered (or, when allowed, newly measured) choice for ``act(x @ weight^T + bias)``.

    Args:
        x: ``[..., K]`` CUDA fp16/bf16/fp32 input.
        weight: ``[N, K]``; bias ``[N]`` or ``None``.
        kind: canonical activation kind.
        cublas: runs the cuBLAS + fused-kernel path once on the same operands (timed as the baseline).

    Returns:
        ``None`` for the cuBLAS path, else the Triton launch configuration to use.
    """
    k, n = x.shape[-1], weight.shape[0]
    m = x.numel() // k
    key = tune_key(m, n, k, kind, x.dtype, x.device)
    if key in _CHOICES:
        return _CHOICES[key]
    if not can_search(x):
        return None
    times: dict[str, float] = {"cublas": _median_ms(cublas)}
    ref = cublas().float()
    tol = 1e-2 * ref.abs().max().item() + 1e-3
    best: tuple[float, Choice] = (times["cublas"], None)
    for cfg in candidate_configs(m, n, k, x.dtype, num_sms(x.device)):
        try:
            if (linear_fwd(x, weight, bias, kind, config=cfg).float() - ref).abs().max().item() > tol:
                continue  # a miscompiled config is never chosen
            t = _median_ms(lambda cfg=cfg: linear_fwd(x, weight, bias, kind, config=cfg))
        except Exception:  # noqa: BLE001 - a config this compiler/GPU cannot build (resources) is just not a candidate
            continue
        times[str(cfg)] = t
        if t < best[0]:
            best = (t, cfg)
    _CHOICES[key] = best[1]
    MEASURED[key] = times
    return best[1]


def set_choice(key: tuple, choice: Choice) -> None:
    """Pin the choice for a :func:`tune_key` (``None`` = cuBLAS + fused kernel)."""
    _CHOICES[key] = choice


def lookup(key: tuple) -> Choice | str:
    """The remembered choice for ``key``, or ``"unknown"``."""
    return _CHOICES.get(key, "unknown")


def chose_triton(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a search already picked the Triton GEMM for this shape bucket and dtype (any activation, device)."""
    head = (next_power_of_2(m), n, k)
    return any(key[:3] == head and key[4] == dtype and c is not None for key, c in list(_CHOICES.items()))


def clear() -> None:
    """Forget every choice and measurement."""
    _CHOICES.clear()
    MEASURED.clear()


__all__ = [
    "MEASURED",
    "can_search",
    "candidate_configs",
    "choose",
    "chose_triton",
    "clear",
    "lookup",
    "set_choice",
    "tune_key",
]
