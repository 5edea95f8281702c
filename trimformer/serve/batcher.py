"""Token-budget dynamic batching: one model worker thread packs queued requests and scatters results back.

Requests become :class:`Job` objects (already tokenized) in a FIFO queue. The worker takes a *window*: sequences
from the head of the queue, in arrival order, until ``max_batch_tokens`` valid tokens are taken (a request may be
split over several windows; a sequence longer than the budget gets a window of its own). The model call packs the
window without padding (length-sorted inside), and each result row goes back to the job it came from; a job's
future is resolved, on its event loop, once all its rows are in.

Isolation: a row depends only on its own tokens (packed attention never mixes sequences). When a model call fails,
each job of the window is run again alone, so only the job that fails alone gets the error (HTTP 500) and its
batchmates still get their results; the worker then goes on with the queue. A cancelled job (its client left) is
dropped from the queue; if part of it is already in a running window, those rows are discarded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("trimformer.serve")

#: ``run(kind, input_ids, token_type_ids) -> [N, D] float32 CPU tensor`` (rows in input order).
RunFn = Callable[[str, Sequence[Sequence[int]], Sequence[Sequence[int]] | None], torch.Tensor]


class ModelError(RuntimeError):
    """The model call that held a job's rows failed (the job gets HTTP 500; the server keeps serving)."""


@dataclass(eq=False)
class Job:
    """One request's sequences on their way through the model.

    Attributes:
        kind: ``"embed"`` or ``"classify"``; a window holds one kind.
        input_ids: ``N`` token-id lists.
        token_type_ids: ``N`` segment-id lists, or ``None``.
        future: resolved with the ``[N, D]`` float32 result (rows in input order) or a :class:`ModelError`.
        loop: the event loop that owns ``future``.
    """

    kind: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    lengths: list[int] = field(init=False)
    taken: int = 0
    done: int = 0
    result: torch.Tensor | None = None
    cancelled: bool = False
    failed: bool = False
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        self.lengths = [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def cancel(self) -> None:
        """Drop the job (called from the event loop): rows not yet taken are never computed."""
        self.cancelled = True


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def _post(job: Job, value: object) -> None:
    """Resolve ``job.future`` on its loop (a loop already closed at shutdown has nobody left to tell)."""
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, value)
    except RuntimeError:
        pass


class Batcher:
    """The queue and the one worker thread that runs the model.

    Args:
        run: the model call (see :data:`RunFn`); it runs on the worker thread only.
        max_batch_tokens: token budget of one window.
        metrics: optional :class:`~trimformer.serve.metrics.Metrics` (batch sizes, tokens, queue, errors).
    """

    def __init__(self, run: RunFn, max_batch_tokens: int, *, metrics=None) -> None:
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._queued = 0  # sequences waiting (not yet taken)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="trimformer-model-worker", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job; returns its future. ``RuntimeError`` after :meth:`stop`."""
        if len(job) == 0:
            raise ValueError("a job needs at least one sequence")
        job.submitted_at = time.perf_counter()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the batcher is stopped")
            self._queue.append(job)
            self._queued += len(job)
            self._cond.notify()
        self._gauge()
        return job.future

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for the model (not counting the window being computed)."""
        return self._queued

    @property
    def queued_jobs(self) -> int:
        return len(self._queue)

    def stop(self, timeout: float | None = None) -> bool:
        """Let the worker finish every queued job, then end it. Returns whether it ended within ``timeout``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker thread
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(self._queued, len(self._queue))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                window = self._take_window()
            self._gauge()
            if window:
                self._process(window)

    def _drop(self, job: Job) -> None:
        """Remove the head job (cancelled or failed) with its untaken rows (caller holds the lock)."""
        self._queue.popleft()
        left = len(job) - job.taken
        self._queued -= left
        if job.cancelled and self.metrics is not None:
            self.metrics.dropped_sequences(left)

    def _take_window(self) -> list[tuple[Job, int, int]]:
        """Segments ``(job, start, end)`` from the queue head, up to the token budget (caller holds the lock)."""
        window: list[tuple[Job, int, int]] = []
        kind, tokens, budget = None, 0, self.max_batch_tokens
        now = time.perf_counter()
        while self._queue and tokens < budget:
            job = self._queue[0]
            if job.cancelled or job.failed:
                self._drop(job)
                continue
            if kind is not None and job.kind != kind:
                break
            kind = job.kind
            start = end = job.taken
            while end < len(job) and (tokens == 0 or tokens + job.lengths[end] <= budget):
                tokens += job.lengths[end]
                end += 1
            if end == start:
                break
            if start == 0 and self.metrics is not None:
                self.metrics.queue_wait(now - job.submitted_at)
            window.append((job, start, end))
            job.taken = end
            self._queued -= end - start
            if end < len(job):
                break  # budget full inside this job
            self._queue.popleft()
        return window

    def _call(self, kind: str, window: list[tuple[Job, int, int]]) -> torch.Tensor:
        ids = [job.input_ids[i] for job, s, e in window for i in range(s, e)]
        types = None
        if any(job.token_type_ids is not None for job, _, _ in window):
            types = [
                job.token_type_ids[i] if job.token_type_ids is not None else [0] * job.lengths[i]
                for job, s, e in window
                for i in range(s, e)
            ]
        t0 = time.perf_counter()
        out = self._run(kind, ids, types)
        if self.metrics is not None:
            self.metrics.batch(len(ids), sum(len(x) for x in ids), time.perf_counter() - t0)
        if out.shape[0] != len(ids):
            raise RuntimeError(f"the model returned {out.shape[0]} rows for {len(ids)} sequences")
        return out

    def _process(self, window: list[tuple[Job, int, int]]) -> None:
        kind = window[0][0].kind
        try:
            out = self._call(kind, window)
        except Exception as exc:  # noqa: BLE001 - any model failure must not end the worker
            logger.exception("model call failed for a window of %d request(s)", len(window))
            if self.metrics is not None:
                self.metrics.model_error()
            if len(window) == 1:
                self._fail(window[0][0], exc)
                return
            # retry each request alone: only the ones that fail by themselves get the error
            for segment in window:
                if segment[0].cancelled:
                    continue
                try:
                    self._scatter([segment], self._call(kind, [segment]))
                except Exception as alone:  # noqa: BLE001
                    logger.exception("model call failed for one request alone")
                    if self.metrics is not None:
                        self.metrics.model_error()
                    self._fail(segment[0], alone)
            return
        self._scatter(window, out)

    def _scatter(self, window: list[tuple[Job, int, int]], out: torch.Tensor) -> None:
        offset = 0
        for job, start, end in window:
            n = end - start
            rows = out[offset : offset + n]
            offset += n
            if job.cancelled or job.failed:
                continue
            if job.result is None:
                job.result = torch.empty(len(job), out.shape[1], dtype=out.dtype)
            job.result[start:end] = rows
            job.done += n
            if job.done == len(job):
                _post(job, job.result)

    def _fail(self, job: Job, exc: Exception) -> None:
        job.failed = True
        message = f"model error: {type(exc).__name__}: {exc}".splitlines()[0][:500]
        _post(job, ModelError(message))
