"""Measured choice, per GEMM shape, between cuBLAS (+ the fused bias-activation kernel) and the Triton GEMM with the
bias and activation in its epilogue (one of a few Hopper-sized launch configurations, pointer or TMA kernel).

Which one wins depends on the shape and on the machine (NOTES.md), so ``linear(impl="auto")`` measures instead of
guessing: the first time a CUDA GEMM of a given ``(row bucket, N, K, activation, dtype, device)`` runs outside a
CUDA-graph capture, every candidate is timed on the real operands and the fastest is remembered. The row bucket is
the next power of two of ``M``.

Timing measures what the model pays inside its CUDA graphs, i.e. GPU time only: each candidate runs once eagerly
(compiles, warms), then a CUDA graph of a few back-to-back calls is captured and replayed (median over replays, per
call). The calls cycle through copies of the weight that together span twice the L2 cache, so every call reads its
weight from device memory as in a forward (BERT-base's 170 MB of weights do not stay in a 50 MB L2; back-to-back
calls on one weight measured L2-resident GEMMs and hid what prefetching it costs or saves). On sm_90+ the Triton
candidates launch with programmatic dependent launch as in the model (NOTES.md, round
5): each call's prologue (weight prefetch, launch) overlaps the previous call's tail, as it overlaps the previous
layer op in a forward, while cuBLAS launches plainly; so the comparison prices what the graph replays. Timing
single eager calls between events instead measured host launch overhead at small ``M`` (a Triton launch costs more
host time than a cuBLAS one) and picked slow kernels for graphed forwards.

The search synchronises the device, so it is skipped (and cuBLAS used, without remembering anything) while a stream
is capturing, under ``torch.compile`` tracing, and when ``torch.cuda`` sync debugging is on. The engine captures its
graphs after warm-up forwards, so captured graphs use the tuned choice. :func:`set_choice` pins one, :func:`clear`
forgets all.
"""

from __future__ import annotations

import functools
import itertools
import statistics
from collections.abc import Callable

import torch

from trimformer.ops.linear.gemm import GemmConfig, default_config, linear_fwd
from trimformer.ops.linear.splitk import SplitKConfig, default_split_k_config
from trimformer.ops.triton_utils import cdiv, next_power_of_2, num_sms, pdl_mode

#: ``None`` = cuBLAS + fused bias-activation kernel (or + add_layer_norm); a :class:`GemmConfig` = the Triton GEMM
#: with that config; a :class:`SplitKConfig` = split-K Triton GEMM reduced in the add + LayerNorm kernel.
Choice = GemmConfig | SplitKConfig | None
#: the ``kind`` of :func:`tune_key` for ``linear_add_layer_norm`` (GEMM + bias + residual + LayerNorm)
ADD_LN = "add_layer_norm"
_CHOICES: dict[tuple, Choice] = {}
#: what the last searches measured, ``key -> {candidate name: ms}`` (benchmarks report it).
MEASURED: dict[tuple, dict[str, float]] = {}
#: timed graph replays per candidate (median)
_REPLAYS = 7
#: a captured graph holds about this many FLOPs of back-to-back calls (at most 16 calls, at least 1)
_GRAPH_FLOPS = 2e10
_STREAMS: dict[int, torch.cuda.Stream] = {}
#: most weight copies one search cycles through (the copies span twice the L2 cache, up to this many)
_MAX_COPIES = 128


@functools.cache
def _l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 50 * 2**20))


def weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` and enough clones of it that cycling through them spans twice the device's L2 cache (at most
    :data:`_MAX_COPIES` in all): timed calls then read their weight from device memory, as in a forward."""
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    n = min(_MAX_COPIES, cdiv(2 * _l2_bytes(index), max(1, weight.numel() * weight.element_size())))
    return [weight] + [weight.clone() for _ in range(n - 1)]


def tune_key(m: int, n: int, k: int, kind: str, dtype: torch.dtype, device: torch.device) -> tuple:
    """Cache key of a GEMM ``[m, k] x [k, n]`` with activation ``kind``: ``m`` is bucketed to a power of two; the
    last element is the Triton kernels' PDL mode (``TRIMFORMER_PDL``: a choice measured one way is
    not reused the other way)."""
    return (next_power_of_2(m), n, k, kind, dtype, device.index, pdl_mode(device, m))


def candidate_configs(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> list[GemmConfig]:
    """Launch configurations worth timing for this shape (the shape-only default first, no duplicates).

    Hopper sizes: wgmma tiles of 64-256 rows and columns with one (4 warps) or two (8 warps) warpgroups; 4-warp
    128x128 / 64x256 tiles fit two programs per SM (one's epilogue overlaps the other's K loop); the TMA kernel with
    its epilogue stored in two halves (no register spills at 128x256); persistent grids.
    """
    g = GemmConfig
    out = [default_config(m, n, k, dtype, sms)]
    if dtype == torch.float32:
        return out
    if m <= 512:
        out += [g(64, 64, 64, 8, 4, 4), g(64, 128, 64, 8, 4, 4, tma=True), g(64, 64, 64, 8, 4, 4, tma=True),
                g(128, 64, 64, 8, 4, 4, tma=True), g(64, 128, 128, 8, 4, 3, tma=True)]  # fmt: skip
    else:
        out += [g(128, 128, 64, 8, 4, 3, True, tma=True, split=2, ctas_per_sm=2),
                g(128, 256, 64, 8, 8, 3, True, tma=True, split=2), g(128, 128, 64, 8, 8, 4, True, tma=True),
                g(128, 128, 64, 8, 4, 3, tma=True, split=2), g(128, 256, 64, 8, 8, 3, tma=True, split=2)]  # fmt: skip
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


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One capture stream per device (cuBLAS keeps a workspace per stream: a new stream per search would leak)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def graph_ms(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Median GPU milliseconds of one ``fn()`` call: a CUDA graph of ``calls`` back-to-back calls is captured
    (after one eager call that compiles and warms up) and replayed :data:`_REPLAYS` times between CUDA events.

    ``fn`` must be graph-capturable (no host syncs); its outputs live in the graph's private memory pool, freed with
    the graph.
    """
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    stream = _side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            for _ in range(calls):
                fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(_REPLAYS)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(_REPLAYS)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize(device)
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / calls
    del graph
    return ms


def _search(key: tuple, run: Callable, weight: torch.Tensor, candidates: list, calls: int, device) -> object:
    """Time ``run(None, w)`` (the cuBLAS path) and ``run(cfg, w)`` for every candidate as graph replays, ``w`` cycling
    through :func:`weight_copies` (at least one call per copy); remember and return the fastest (``None`` when cuBLAS
    wins). A candidate whose output differs from cuBLAS's by more than 1% of its max is never chosen (a
    miscompile); one this compiler or GPU cannot build is skipped."""
    weights = weight_copies(weight)
    calls = max(calls, len(weights))

    def timed(cfg) -> float:
        cycle = itertools.cycle(weights)
        return graph_ms(lambda: run(cfg, next(cycle)), calls, device)

    times: dict[str, float] = {"cublas": timed(None)}
    ref = run(None, weight).float()
    tol = 1e-2 * ref.abs().max().item() + 1e-3
    best: tuple[float, object] = (times["cublas"], None)
    for cfg in candidates:
        try:
            if (run(cfg, weight).float() - ref).abs().max().item() > tol:
                continue
            t = timed(cfg)
        except Exception:  # noqa: BLE001 - a config this compiler/GPU cannot build (resources) is just not a candidate
            continue
        times[str(cfg)] = t
        if t < best[0]:
            best = (t, cfg)
    _CHOICES[key] = best[1]
    MEASURED[key] = times
    return best[1]


def graph_calls(m: int, n: int, k: int) -> int:
    """Calls per timed graph for an ``[m, k] x [k, n]`` GEMM: enough back-to-back work to swamp replay gaps."""
    return max(1, min(16, int(_GRAPH_FLOPS // max(1, 2 * m * n * k))))


def choose(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    cublas: Callable[[torch.Tensor], object],
) -> Choice:
    """The remembered (or, when allowed, newly measured) choice for ``act(x @ weight^T + bias)``.

    Args:
        x: ``[..., K]`` CUDA fp16/bf16/fp32 input.
        weight: ``[N, K]``; bias ``[N]`` or ``None``.
        kind: canonical activation kind.
        cublas: ``cublas(w)`` runs the cuBLAS (+ fused-kernel) path once on ``x`` and the weight ``w`` (``weight`` or
            a copy of it; timed as the baseline; must be graph-capturable).

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
    run = lambda cfg, w: cublas(w) if cfg is None else linear_fwd(x, w, bias, kind, config=cfg)  # noqa: E731
    cands = candidate_configs(m, n, k, x.dtype, num_sms(x.device))
    return _search(key, run, weight, cands, graph_calls(m, n, k), x.device)


def split_k_candidates(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> list[SplitKConfig]:
    """Split-K configurations worth timing for ``linear_add_layer_norm`` at this shape (default first).

    Small ``M`` x ``N = H`` grids leave most SMs idle (``M = 300``, ``N = 768``, 64 x 64 tiles: 60 programs on
    132 SMs, each looping over all of ``K``): cutting ``K`` into 2-6 chunks multiplies the programs.
    """
    s = SplitKConfig
    out = [default_split_k_config(m, n, k, dtype, sms)]
    if dtype != torch.float32:  # the winners of the H100 sweep (M = 128-600, N = 768, K = 768 / 3072)
        out += [s(64, 128, 64, 8, 4, 4, splits, tma=True) for splits in (2, 3, 4)]
        out += [s(64, 64, 128, 8, 4, 3, splits, tma=True) for splits in (2, 4)]
        out += [s(64, 64, 64, 8, 4, 4, splits, tma=True) for splits in (4, 6)]
        out += [s(64, 64, 64, 8, 4, 4, splits) for splits in (2, 4)]
    return [c for i, c in enumerate(out) if c not in out[:i] and c.splits <= max(1, k // c.block_k)]


def choose_split_k(
    x: torch.Tensor, weight: torch.Tensor, run: Callable[[SplitKConfig | None, torch.Tensor], object]
) -> SplitKConfig | None:
    """The remembered (or, when allowed, newly measured) choice for ``linear_add_layer_norm`` on ``x [M, K]``,
    ``weight [N, K]``: ``None`` (cuBLAS, then the add + LayerNorm kernel) or a split-K configuration.

    Args:
        x: ``[M, K]`` CUDA fp16/bf16 input; weight: ``[N, K]``.
        run: ``run(choice, w)`` computes the whole op once with that choice on the real operands, the weight being
            ``w`` (``weight`` or a copy of it; graph-capturable).

    Returns:
        ``None`` for the cuBLAS path, else the split-K configuration to use.
    """
    k, n = x.shape[-1], weight.shape[0]
    m = x.numel() // k
    key = tune_key(m, n, k, ADD_LN, x.dtype, x.device)
    if key in _CHOICES:
        return _CHOICES[key]  # type: ignore[return-value]
    if not can_search(x):
        return None
    candidates = split_k_candidates(m, n, k, x.dtype, num_sms(x.device))
    return _search(key, run, weight, candidates, graph_calls(m, n, k), x.device)  # type: ignore[return-value]


def set_choice(key: tuple, choice: Choice) -> None:
    """Pin the choice for a :func:`tune_key` (``None`` = cuBLAS + fused kernel)."""
    _CHOICES[key] = choice


def lookup(key: tuple) -> Choice | str:
    """The remembered choice for ``key``, or ``"unknown"``."""
    return _CHOICES.get(key, "unknown")


def chose_triton(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether a search already picked the Triton GEMM for this shape bucket and dtype (any activation, device)."""
    head = (next_power_of_2(m), n, k)
    return any(
        key[:3] == head and key[3] not in (ADD_LN, "identity") and key[4] == dtype and c is not None
        for key, c in list(_CHOICES.items())
    )


def clear() -> None:
    """Forget every choice and measurement."""
    _CHOICES.clear()
    MEASURED.clear()


__all__ = [
    "ADD_LN",
    "MEASURED",
    "can_search",
    "candidate_configs",
    "graph_calls",
    "graph_ms",
    "choose",
    "choose_split_k",
    "chose_triton",
    "clear",
    "lookup",
    "set_choice",
    "split_k_candidates",
    "tune_key",
]
