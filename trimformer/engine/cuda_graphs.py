"""CUDA-graph replay of a packed encoder forward, one graph per token-count bucket.

Small batches are launch bound (an eager BERT-base forward issues ~100 kernels, each a few microseconds of host
work); replaying a captured graph removes that floor. A graph has static shapes, so a batch of ``T`` tokens in
``N`` sequences (longest ``L``) runs in the graph of its :class:`GraphKey`:

* ``tokens``: ``T`` rounded up (only the *total* is rounded: every real sequence keeps its exact length). The
  ``tokens - T`` padding tokens go after the real ones and form their own dummy sequences of at most
  :data:`PAD_CHUNK` tokens, so attention never mixes them with real tokens and costs little on them;
* ``seqs``: sequence slots, ``N`` rounded up to a power of two plus room for the dummy sequences; unused slots are
  empty sequences (``cu_seqlens`` repeats ``tokens``), whose attention programs exit at once;
* ``max_seqlen``: ``L`` rounded up to a power of two (at least :data:`PAD_CHUNK`): the attention kernel only sizes
  its grid with it, an upper bound is exact;
* ``has_types``: whether token-type ids are given.

Every op of the forward is per token except attention, which is per sequence, so real rows do not depend on what
the padding rows hold (they keep an earlier batch's valid ids: no clearing kernels) and equal an eager forward of the
same packed tensors with the same ``max_seqlen``. Static inputs are refilled with
device-to-device copies (and one pinned host-to-device copy of ``cu_seqlens``) before each replay: no host syncs.
Capturing a new bucket synchronises once (warm-up and capture); replays never do.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from trimformer.ops.varlen import PackedBatch

#: longest dummy sequence made of padding tokens.
PAD_CHUNK = 64
#: smallest token rounding step (a multiple of 16 keeps GEMM rows aligned).
MIN_STEP = 16
#: default largest token bucket captured (the default ``embed`` token budget).
DEFAULT_MAX_TOKENS = 16384


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def token_bucket(t: int) -> int:
    """``t`` rounded up to a multiple of :func:`token_bucket_step`: under 6.25% padding (plus at most
    ``MIN_STEP - 1`` tokens for batches under 256 tokens), 16 buckets per power of two."""
    step = token_bucket_step(t)
    return max(step, -(-t // step) * step)


@dataclass(frozen=True)
class GraphKey:
    """Static shape of one captured graph (see the module docstring)."""

    tokens: int
    seqs: int
    max_seqlen: int
    has_types: bool

    @classmethod
    def for_batch(cls, batch: PackedBatch) -> GraphKey:
        tokens = token_bucket(batch.num_tokens)
        # the padding is less than one rounding step, so this many dummy slots always suffice
        seqs = _next_pow2(max(batch.num_seqs, 1)) + -(-token_bucket_step(tokens) // PAD_CHUNK)
        return cls(
            tokens=tokens,
            seqs=seqs,
            max_seqlen=max(PAD_CHUNK, _next_pow2(batch.max_seqlen)),
            has_types=batch.token_type_ids is not None,
        )


def token_bucket_step(tokens: int) -> int:
    """Rounding step for ``tokens``: a sixteenth of the largest power of two ``<= tokens``, at least
    :data:`MIN_STEP`. Non-decreasing in ``tokens``, so a bucket's step bounds the padding of every batch in it.
    (An eighth cost 7% at B = 16, S = 512 on the H100: 4772 tokens ran as 5120; a floor of 64 made B = 1, S = 512's
    270 tokens run as 320.)"""
    return max(MIN_STEP, (1 << (max(tokens, 1).bit_length() - 1)) // 16)


def static_cu_seqlens(seqlens: tuple[int, ...], key: GraphKey) -> list[int]:
    """``cu_seqlens`` (``key.seqs + 1`` host ints) of ``seqlens`` followed by the dummy padding sequences and empty
    slots that fill the bucket ``key``."""
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    while cu[-1] < key.tokens:
        cu.append(min(key.tokens, cu[-1] + PAD_CHUNK))
    if len(cu) > key.seqs + 1:
        raise ValueError(f"{len(cu) - 1} sequences do not fit the {key.seqs} slots of graph bucket {key}")
    cu.extend([key.tokens] * (key.seqs + 1 - len(cu)))
    return cu


def warmup_cu_seqlens(key: GraphKey) -> list[int]:
    """A valid ``cu_seqlens`` filling ``key`` for the warm-up and capture runs (``key.seqs`` equal chunks; replays
    overwrite it with the real layout)."""
    chunk = -(-key.tokens // key.seqs)
    return [min(key.tokens, i * chunk) for i in range(key.seqs + 1)]


class _Graph:
    """One captured forward and its static buffers."""

    def __init__(self, model, key: GraphKey, device: torch.device, pool, position_offset: int) -> None:
        t = key.tokens
        self.key = key
        self.ids = torch.zeros(t, dtype=torch.long, device=device)
        self.pos = torch.full((t,), position_offset, dtype=torch.long, device=device)
        self.types = torch.zeros(t, dtype=torch.long, device=device) if key.has_types else None
        self.cu = torch.tensor(warmup_cu_seqlens(key), dtype=torch.int32, device=device)
        self.position_offset = position_offset
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile/warm every kernel outside the capture
                model.encode(self.ids, self.pos, self.types, self.cu, key.max_seqlen)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = model.encode(self.ids, self.pos, self.types, self.cu, key.max_seqlen)

    def replay(self, batch: PackedBatch) -> torch.Tensor:
        t = batch.num_tokens
        # Padding rows keep whatever valid ids/positions/types an earlier batch left there: they only feed the dummy
        # sequences, which no real token attends to, so clearing them would cost kernels and change nothing.
        self.ids[:t].copy_(batch.input_ids, non_blocking=True)
        self.pos[:t].copy_(batch.position_ids, non_blocking=True)
        if self.types is not None:
            self.types[:t].copy_(batch.token_type_ids, non_blocking=True)
        cu = torch.tensor(static_cu_seqlens(batch.seqlens, self.key), dtype=torch.int32)
        self.cu.copy_(cu.pin_memory() if self.cu.is_cuda else cu, non_blocking=True)
        self.graph.replay()
        return self.out[:t]


class GraphedEncoder:
    """Runs ``model.encode`` on packed batches through CUDA graphs captured per :class:`GraphKey`.

    Args:
        model: an encoder with ``encode(input_ids, position_ids, token_type_ids, cu_seqlens, max_seqlen)`` and a
            ``config.position_offset`` (e.g. :class:`~trimformer.models.encoders.EncoderModel`), on a CUDA device.
        max_tokens: largest token bucket captured; bigger batches are not :meth:`eligible`.
        max_graphs: captured graphs kept (least recently used ones are dropped); they share one memory pool, so
            each kept graph costs only its static inputs and its ``[tokens, hidden]`` output. Serving traffic of
            small mixed batches touches 50-150 keys (token bucket x sequence slots x max-length bucket); a cache
            smaller than that re-captures on most batches.
    """

    def __init__(self, model, *, max_tokens: int = DEFAULT_MAX_TOKENS, max_graphs: int = 256) -> None:
        if max_tokens <= 0 or max_graphs <= 0:
            raise ValueError(f"max_tokens and max_graphs must be positive, got {max_tokens}, {max_graphs}")
        self.model = model
        self.max_tokens = int(max_tokens)
        self.max_graphs = int(max_graphs)
        self.device = next(model.parameters()).device
        self._graphs: OrderedDict[GraphKey, _Graph] = OrderedDict()
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """Graphs currently captured."""
        return len(self._graphs)

    def eligible(self, batch: PackedBatch) -> bool:
        """Whether :meth:`__call__` can run this batch (CUDA model, 1..``max_tokens`` tokens after rounding)."""
        return (
            self.device.type == "cuda"
            and batch.num_tokens > 0
            and token_bucket(batch.num_tokens) <= self.max_tokens
            and hasattr(self.model, "encode")
        )

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, H]`` last hidden states of ``batch`` (moved to the model's device if needed).

        The result is a view of the graph's static output: it is overwritten by the next call that uses the same
        bucket; clone it to keep it.
        """
        if not self.eligible(batch):
            raise ValueError(
                f"batch of {batch.num_tokens} tokens cannot run in a CUDA graph here (device {self.device}, "
                f"max_tokens {self.max_tokens})"
            )
        with torch.inference_mode():
            return self._run(batch.to(self.device))

    def _run(self, batch: PackedBatch) -> torch.Tensor:
        key = GraphKey.for_batch(batch)
        graph = self._graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            graph = _Graph(self.model, key, self.device, self._pool, self.model.config.position_offset)
            self._graphs[key] = graph
        else:
            self._graphs.move_to_end(key)
        return graph.replay(batch)

    def clear(self) -> None:
        """Drop every captured graph (frees their static buffers) and their memory pool (a pool whose graphs are
        all gone cannot take a new capture: PyTorch asserts)."""
        self._graphs.clear()
        self._pool = None


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MIN_STEP",
    "PAD_CHUNK",
    "GraphKey",
    "GraphedEncoder",
    "static_cu_seqlens",
    "token_bucket",
]
