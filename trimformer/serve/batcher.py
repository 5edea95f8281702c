"""Token-budget dynamic batching: a tokenizer stage and one model worker thread, results scattered back in bulk.

Requests become :class:`Job` objects. A job that arrives as raw texts (``texts``) or with its own tokenization
(``prepare``) first goes to the *tokenizer stage*: ``tokenizer_threads`` threads (one by default), each taking every
job waiting in the inbox and tokenizing all their texts in **one** call of the fast tokenizer (HF fast tokenizers
batch in Rust), then splitting the ids back per job. Each job's ``check`` (the server's 413 for over-long inputs)
runs there, so a refused request is answered without ever reaching the model, and its batchmates go on. The stage
works on the next window's requests while the model runs the current one: tokenization is off the model's critical
path and off the event loop. A job that arrives as token ids skips the stage.

The model worker takes a *window*: sequences from the head of the FIFO model queue, in arrival order, until
``max_batch_tokens`` valid tokens are taken (a request may be split over several windows; a sequence longer than the
budget gets a window of its own). The model call packs the window without padding, and each result row goes back
to the job it came from as a numpy float32 array (L2-normalised in the worker when the job asks for it). Finished
jobs of a window are resolved together: one ``loop.call_soon_threadsafe`` per event loop and window, not one per
job. Handing a job to a thread costs the event loop a deque append, and a notify only when that thread sleeps.

Isolation: a row depends only on its own tokens (packed attention never mixes sequences). When a model call fails,
each job of the window is run again alone, so only the job that fails alone gets the error (HTTP 500) and its
batchmates still get their results; the worker then goes on with the queue. A failing batched tokenizer call is
likewise retried per job. A cancelled job (its client left) is dropped wherever it waits; if part of it is already
in a running window, those rows are discarded.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from trimformer.engine.tokenization import Tokenized

logger = logging.getLogger("trimformer.serve")

#: ``run(kind, input_ids, token_type_ids) -> [N, D] float32 CPU tensor`` (rows in input order).
RunFn = Callable[[str, Sequence[Sequence[int]], Sequence[Sequence[int]] | None], torch.Tensor]
#: ``tokenize(texts) -> Tokenized`` (over-long texts cut to the model's limit, their indices in ``.truncated``).
TokenizeFn = Callable[[list[str]], Tokenized]

#: Most texts the stage hands to one tokenizer call (bigger inboxes are split, so the model gets fed early).
MAX_TOKENIZE_TEXTS = 2048


class ModelError(RuntimeError):
    """The model call that held a job's rows failed (the job gets HTTP 500; the server keeps serving)."""


@dataclass(eq=False)
class Job:
    """One request's sequences on their way through the tokenizer stage and the model.

    Attributes:
        kind: ``"embed"`` or ``"classify"``; a window holds one kind.
        input_ids: ``N`` token-id lists, or ``None`` until the tokenizer stage fills them (``texts``/``prepare``).
        token_type_ids: ``N`` segment-id lists, or ``None``.
        future: resolved with the ``[N, D]`` float32 numpy array (rows in input order) or an exception:
            :class:`ModelError`, or whatever ``prepare``/the tokenizer/``check`` raised.
        loop: the event loop that owns ``future``.
        texts: raw texts, tokenized by the stage together with other jobs' texts.
        prepare: a tokenization of its own (pairs, mixed inputs), run by the stage for this job alone.
        check: called by the stage with the job's :class:`Tokenized`; an exception it raises answers the job
            (e.g. 413 for an over-long input) and the job never reaches the model.
        normalize: L2-normalise the result rows (in the worker thread).
        num_tokens: valid tokens of the job (after truncation), known once tokenized.
    """

    kind: str
    input_ids: list[list[int]] | None
    token_type_ids: list[list[int]] | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    texts: list[str] | None = None
    prepare: Callable[[], Tokenized] | None = None
    check: Callable[[Tokenized], None] | None = None
    normalize: bool = False
    lengths: list[int] = field(default_factory=list)
    num_tokens: int = 0
    taken: int = 0
    done: int = 0
    result: np.ndarray | None = None
    cancelled: bool = False
    failed: bool = False
    submitted_at: float = 0.0

    def __post_init__(self) -> None:
        if self.input_ids is not None:
            self._set_lengths()

    def _set_lengths(self) -> None:
        self.lengths = [len(ids) for ids in self.input_ids]
        self.num_tokens = sum(self.lengths)

    @property
    def needs_tokens(self) -> bool:
        """Whether the job still has to go through the tokenizer stage."""
        return self.input_ids is None

    def __len__(self) -> int:
        if self.input_ids is not None:
            return len(self.input_ids)
        return len(self.texts) if self.texts is not None else 1

    def cancel(self) -> None:
        """Drop the job (called from the event loop): rows not yet taken are never computed."""
        self.cancelled = True


def _resolve_many(items: list[tuple[asyncio.Future, object]]) -> None:
    for future, value in items:
        if not future.done():
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)


def _post_many(items: list[tuple[Job, object]]) -> None:
    """Resolve each job's future with its value: one ``call_soon_threadsafe`` per event loop (a loop already closed
    at shutdown has nobody left to tell)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, value in items:
        by_loop.setdefault(job.loop, []).append((job.future, value))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve_many, batch)
        except RuntimeError:
            pass


class Batcher:
    """The tokenizer stage, the model queue and the one worker thread that runs the model.

    Args:
        run: the model call (see :data:`RunFn`); it runs on the worker thread only.
        max_batch_tokens: token budget of one window.
        metrics: optional :class:`~trimformer.serve.metrics.Metrics` (batch sizes, tokens, errors, tokenization).
        tokenize: batched tokenization of raw texts (see :data:`TokenizeFn`); needed for jobs with ``texts``.
        tokenizer_threads: threads of the tokenizer stage.
        warm_thread: called once in each stage thread before it serves (e.g. to load its own tokenizer).
    """

    def __init__(
        self,
        run: RunFn,
        max_batch_tokens: int,
        *,
        metrics=None,
        tokenize: TokenizeFn | None = None,
        tokenizer_threads: int = 1,
        warm_thread: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        if tokenizer_threads <= 0:
            raise ValueError(f"tokenizer_threads must be positive, got {tokenizer_threads}")
        self._run = run
        self._tokenize = tokenize
        self._warm = warm_thread
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self.tokenizer_threads = tokenizer_threads
        # deque appends/pops are atomic: the event loop appends without the lock and notifies only a sleeping thread
        # (a thread sets its flag under the lock *before* it looks at its queue, so no job is left unnoticed)
        self._inbox: deque[Job] = deque()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()  # guards the sleeping flags, the counters and the window's queue head
        self._stage_sleeping = 0
        self._worker_sleeping = False
        self._stopping = False
        self._stage_alive = 0
        self._thread: threading.Thread | None = None
        self._stage: list[threading.Thread] = []

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        """Start the stage threads (each warmed before this returns) and the worker thread (idempotent)."""
        if self._thread is not None:
            return
        ready = threading.Barrier(self.tokenizer_threads + 1)
        self._stage_alive = self.tokenizer_threads
        for i in range(self.tokenizer_threads):
            t = threading.Thread(target=self._stage_loop, args=(ready,), name=f"trimformer-tokenize-{i}", daemon=True)
            t.start()
            self._stage.append(t)
        ready.wait(120)
        self._thread = threading.Thread(target=self._loop, name="trimformer-model-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> asyncio.Future:
        """Queue a job (to the tokenizer stage when it has no token ids yet); returns its future. ``RuntimeError``
        after :meth:`stop`, ``ValueError`` for a job without sequences or without a way to get its tokens."""
        if job.needs_tokens:
            if job.texts is None and job.prepare is None:
                raise ValueError("a job needs input_ids, texts or prepare")
            if job.texts is not None and self._tokenize is None:
                raise ValueError("this batcher has no tokenizer for jobs with texts")
        if len(job) == 0:
            raise ValueError("a job needs at least one sequence")
        if self._stopping:
            raise RuntimeError("the batcher is stopped")
        job.submitted_at = time.perf_counter()
        if job.needs_tokens:
            self._inbox.append(job)
            if self._stage_sleeping:
                with self._cond:
                    self._cond.notify_all()
        else:
            self._queue.append(job)
            if self._worker_sleeping:
                with self._cond:
                    self._cond.notify_all()
        return job.future

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for the model (texts still to tokenize included; not the window being computed)."""
        queued = sum(len(job) - job.taken for job in list(self._queue))
        return queued + sum(len(job) for job in list(self._inbox))

    @property
    def queued_jobs(self) -> int:
        """Requests waiting (in the tokenizer inbox or the model queue)."""
        return len(self._queue) + len(self._inbox)

    def stop(self, timeout: float | None = None) -> bool:
        """Let the stage and the worker finish every queued job, then end them. Returns whether they ended within
        ``timeout``."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in (*self._stage, self._thread):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in (*self._stage, self._thread))

    # ------------------------------------------------------------------ tokenizer stage threads
    def _stage_loop(self, ready: threading.Barrier) -> None:
        try:
            if self._warm is not None:
                self._warm()
        except Exception:  # noqa: BLE001 - a failed warm-up shows again (as a 4xx/5xx) on the first request
            logger.exception("tokenizer warm-up failed")
        try:
            ready.wait(120)
        except threading.BrokenBarrierError:
            pass
        try:
            while True:
                with self._cond:
                    self._stage_sleeping += 1
                    while not self._inbox and not self._stopping:
                        self._cond.wait()
                    self._stage_sleeping -= 1
                    if not self._inbox:
                        return
                    jobs = self._take_inbox()
                self._prepare(jobs)
        finally:
            with self._cond:
                self._stage_alive -= 1
                self._cond.notify_all()

    def _take_inbox(self) -> list[Job]:
        """Jobs from the inbox head, up to :data:`MAX_TOKENIZE_TEXTS` texts (at least one job; caller holds the
        lock)."""
        jobs, texts = [], 0
        while self._inbox and (not jobs or texts + len(self._inbox[0]) <= MAX_TOKENIZE_TEXTS):
            job = self._inbox.popleft()
            texts += len(job)
            jobs.append(job)
        return jobs

    def _tokenize_texts(self, jobs: list[Job]) -> dict[int, Tokenized | BaseException]:
        """``{id(job): Tokenized or the error}`` for jobs with texts: one tokenizer call for all of them (each job
        alone when that call fails)."""
        out: dict[int, Tokenized | BaseException] = {}
        if not jobs:
            return out
        texts = [t for job in jobs for t in job.texts]
        try:
            tok = self._tokenize(texts)
        except Exception:  # noqa: BLE001 - find the job that fails alone
            for job in jobs:
                try:
                    out[id(job)] = self._tokenize(job.texts)
                except Exception as exc:  # noqa: BLE001
                    out[id(job)] = exc
            return out
        if len(jobs) == 1:
            out[id(jobs[0])] = tok
            return out
        truncated = set(tok.truncated)
        start = 0
        for job in jobs:
            end = start + len(job.texts)
            cut = tuple(i - start for i in range(start, end) if i in truncated) if truncated else ()
            out[id(job)] = Tokenized(tok.input_ids[start:end], None, cut)
            start = end
        return out

    def _prepare(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        live = []
        for job in jobs:
            if job.cancelled:
                if self.metrics is not None:
                    self.metrics.dropped_sequences(len(job))
            else:
                live.append(job)
        results = self._tokenize_texts([j for j in live if j.texts is not None])
        for job in live:
            if job.texts is None:
                try:
                    results[id(job)] = job.prepare()
                except Exception as exc:  # noqa: BLE001 - answered to this job only
                    results[id(job)] = exc
        if self.metrics is not None and live:
            self.metrics.tokenized(time.perf_counter() - t0)
        ready, answers = [], []
        for job in live:
            tok = results[id(job)]
            if not isinstance(tok, BaseException) and job.check is not None:
                try:
                    job.check(tok)
                except Exception as exc:  # noqa: BLE001 - e.g. 413: this request is refused, not its batchmates
                    tok = exc
            if isinstance(tok, BaseException):
                job.failed = True
                answers.append((job, tok))
                continue
            job.input_ids, job.token_type_ids, job.texts = tok.input_ids, tok.token_type_ids, None
            job._set_lengths()
            if not job.input_ids:
                answers.append((job, ValueError("the request has no sequences after tokenization")))
                continue
            ready.append(job)
        if ready:
            self._queue.extend(ready)
            if self._worker_sleeping:
                with self._cond:
                    self._cond.notify_all()
        if answers:
            _post_many(answers)

    # ------------------------------------------------------------------ model worker thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._worker_sleeping = True
                while not self._queue and not (self._stopping and self._stage_alive == 0):
                    self._cond.wait()
                self._worker_sleeping = False
                if not self._queue:
                    return
                window = self._take_window()
            if window:
                self._process(window)

    def _drop(self, job: Job) -> None:
        """Remove the head job (cancelled or failed) with its untaken rows (caller holds the lock)."""
        self._queue.popleft()
        left = len(job) - job.taken
        if job.cancelled and self.metrics is not None:
            self.metrics.dropped_sequences(left)

    def _take_window(self) -> list[tuple[Job, int, int]]:
        """Segments ``(job, start, end)`` from the queue head, up to the token budget (caller holds the lock)."""
        window: list[tuple[Job, int, int]] = []
        kind, tokens, budget = None, 0, self.max_batch_tokens
        now = time.perf_counter()
        waits = []
        while self._queue and tokens < budget:
            job = self._queue[0]
            if job.cancelled or job.failed:
                self._drop(job)
                continue
            if kind is not None and job.kind != kind:
                break
            kind = job.kind
            start = end = job.taken
            lengths = job.lengths
            while end < len(lengths) and (tokens == 0 or tokens + lengths[end] <= budget):
                tokens += lengths[end]
                end += 1
            if end == start:
                break
            if start == 0:
                waits.append(now - job.submitted_at)
            window.append((job, start, end))
            job.taken = end
            if end < len(lengths):
                break  # budget full inside this job
            self._queue.popleft()
        if waits and self.metrics is not None:
            self.metrics.queue_waits(waits)
        return window

    def _call(self, kind: str, window: list[tuple[Job, int, int]]) -> torch.Tensor:
        ids = [ids for job, s, e in window for ids in job.input_ids[s:e]]
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
            tokens = sum(sum(job.lengths[s:e]) for job, s, e in window)
            self.metrics.batch(len(ids), tokens, time.perf_counter() - t0)
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
                _post_many([self._fail(window[0][0], exc)])
                return
            # retry each request alone: only the ones that fail by themselves get the error
            answers = []
            for segment in window:
                if segment[0].cancelled:
                    continue
                try:
                    answers += self._scatter([segment], self._call(kind, [segment]))
                except Exception as alone:  # noqa: BLE001
                    logger.exception("model call failed for one request alone")
                    if self.metrics is not None:
                        self.metrics.model_error()
                    answers.append(self._fail(segment[0], alone))
            _post_many(answers)
            return
        _post_many(self._scatter(window, out))

    def _scatter(self, window: list[tuple[Job, int, int]], out: torch.Tensor) -> list[tuple[Job, object]]:
        """Copy each segment's rows into its job; the jobs now complete, with their results."""
        out = np.ascontiguousarray(out.numpy(), dtype=np.float32)
        normed = None
        if any(job.normalize for job, _, _ in window):  # as F.normalize: x / max(||x||, 1e-12)
            normed = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        finished = []
        offset = 0
        for job, start, end in window:
            n = end - start
            rows = (normed if job.normalize else out)[offset : offset + n]
            offset += n
            if job.cancelled or job.failed:
                continue
            if start == 0 and end == len(job):
                job.result = rows  # the whole job in this window: a view, no copy
            else:
                if job.result is None:
                    job.result = np.empty((len(job), out.shape[1]), dtype=out.dtype)
                job.result[start:end] = rows
            job.done += n
            if job.done == len(job):
                finished.append((job, job.result))
        return finished

    def _fail(self, job: Job, exc: Exception) -> tuple[Job, ModelError]:
        job.failed = True
        message = f"model error: {type(exc).__name__}: {exc}".splitlines()[0][:500]
        return job, ModelError(message)
