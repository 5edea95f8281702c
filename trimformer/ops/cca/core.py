"""The latent attention core of a CCA / CCGQA layer on dense input: the fastest causal kernel for the shape.

Our Triton flash kernel (``trimformer.ops.attention``) takes packed and variable-length input; when every sequence
has the same length ``S`` (dense ``[B, S, E]`` input) PyTorch's SDPA backends (cuDNN, FlashAttention-2) can run the
same core, and on Hopper cuDNN is faster (NOTES.md). :func:`pick_dense_core` measures each candidate once per shape
(our kernel; cuDNN and flash SDPA, for grouped heads with ``enable_gqa`` and with the kv heads expanded to the query
heads) and caches the fastest; :func:`dense_core_attention` runs a choice. The probe runs only on CUDA, outside graph
capture and ``torch.compile``; there (and on CPU) the choice is our kernel. The steady state is a dict lookup and one
kernel, with no ``try`` around it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trimformer.ops.attention import varlen_attention


@dataclass(frozen=True)
class CoreChoice:
    """One way to run the core: ``name`` (``"triton"``, ``"sdpa-cudnn"``, ``"sdpa-flash+expand"``, ...), the SDPA
    backend (``None`` for our kernel) and whether grouped kv heads are copied up to the query heads first."""

    name: str
    backend: object = None  # torch.nn.attention.SDPBackend
    expand: bool = False

    @property
    def is_sdpa(self) -> bool:
        return self.backend is not None


TRITON = CoreChoice("triton")
_CACHE: dict[tuple, CoreChoice] = {}
PROBE_REPEATS = 5


def clear_core_cache() -> None:
    """Forget every measured choice (tests, or after changing the GPU's settings)."""
    _CACHE.clear()


def cached_choices() -> dict[tuple, CoreChoice]:
    """A copy of the cache: ``{(device, dtype, B, S, Hq, Hk, D, train): CoreChoice}``."""
    return dict(_CACHE)


def sdpa_candidates(grouped: bool) -> list[CoreChoice]:
    """SDPA choices tried by the probe: cuDNN then flash, each also with expanded kv heads when ``grouped``."""
    from torch.nn.attention import SDPBackend

    out = []
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        out.append(CoreChoice(f"sdpa-{name}", backend, False))
        if grouped:
            out.append(CoreChoice(f"sdpa-{name}+expand", backend, True))
    return out


def dense_core_attention(q, k, v, dense: tuple[int, int], scale: float, choice: CoreChoice) -> torch.Tensor:
    """Causal attention of packed ``q [B*S, Hq, D]``, ``k, v [B*S, Hk, D]`` holding ``B`` sequences of ``S`` tokens
    each (``dense = (B, S)``) through the SDPA ``choice``; returns ``[B*S, Hq, D]`` (differentiable)."""
    from torch.nn.attention import sdpa_kernel

    b, s = dense
    t, hq = q.shape[0], q.shape[1]
    gqa = k.shape[1] != hq
    if gqa and choice.expand:
        k, v = (x.repeat_interleave(hq // k.shape[1], dim=1) for x in (k, v))
        gqa = False
    qd, kd, vd = (x.reshape(b, s, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel([choice.backend]):
        o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(t, hq, v.shape[-1])


def _time_ms(fn, repeats: int) -> float:
    """Median GPU milliseconds of ``fn`` replayed from a CUDA graph (host launch gaps excluded), after warm-up calls
    on a side stream (the first compiles; either may raise)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def probe(b: int, s: int, hq: int, hk: int, d: int, dtype: torch.dtype, device, train: bool,
          candidates: list[CoreChoice] | None = None, repeats: int = PROBE_REPEATS) -> dict[str, float]:  # fmt: skip
    """GPU milliseconds (CUDA-graph replays) of each candidate (default: our kernel and :func:`sdpa_candidates`) on
    random inputs of this shape; forward only, or forward + backward when ``train``. Candidates that fail to run or
    to be captured are left out."""
    gen = torch.Generator(device=device).manual_seed(0)
    r = lambda h: torch.randn(b * s, h, d, device=device, dtype=dtype, generator=gen)
    q, k, v, dout = r(hq), r(hk), r(hk), r(hq)
    cu = torch.arange(b + 1, device=device, dtype=torch.int32) * s
    scale = d**-0.5
    if train:  # .backward() accumulates into .grad: static buffers, so the step can be graph-captured
        for x in (q, k, v):
            x.requires_grad_()
    cands = [TRITON, *sdpa_candidates(hq != hk)] if candidates is None else candidates
    out = {}
    for c in cands:

        def run(c=c):
            with torch.set_grad_enabled(train):
                if c.is_sdpa:
                    o = dense_core_attention(q, k, v, (b, s), scale, c)
                else:
                    o = varlen_attention(q, k, v, cu, s, causal=True, scale=scale, impl="triton")
                if train:
                    o.backward(dout)

        try:  # one-time probe: a backend that rejects this shape is simply not a candidate
            out[c.name] = _time_ms(run, repeats)
        except (RuntimeError, ValueError):
            continue
    return out


def pick_dense_core(q: torch.Tensor, k: torch.Tensor, dense: tuple[int, int], train: bool) -> CoreChoice:
    """The fastest core for packed ``q [B*S, Hq, D]``, ``k [B*S, Hk, D]`` of ``dense = (B, S)`` (``train``: timed
    with the backward), measured on the first call per shape (a few ms to a few hundred ms of GPU time, once; a
    backend that ran in the probe runs the same shape again, so the steady state needs no fallback) and cached. Our
    kernel (:data:`TRITON`) off CUDA, under ``torch.compile`` and during CUDA-graph capture of a shape not measured
    yet (not cached: the next eager call measures)."""
    if not q.is_cuda:
        return TRITON
    b, s = dense
    key = (q.device, q.dtype, b, s, q.shape[1], k.shape[1], q.shape[2], bool(train))
    choice = _CACHE.get(key)
    if choice is not None:
        return choice
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return TRITON
    with torch.cuda.device(q.device):
        times = probe(b, s, q.shape[1], k.shape[1], q.shape[2], q.dtype, q.device, train)
    names = {c.name: c for c in (TRITON, *sdpa_candidates(q.shape[1] != k.shape[1]))}
    best = min(times, key=times.get) if times else TRITON.name
    _CACHE[key] = names[best]
    return names[best]


__all__ = ["TRITON", "CoreChoice", "cached_choices", "clear_core_cache", "dense_core_attention", "pick_dense_core",
           "probe", "sdpa_candidates"]  # fmt: skip
