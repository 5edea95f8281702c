"""Prometheus metrics of the server, rendered as text exposition format 0.0.4 at ``GET /metrics``.

Metric names (all prefixed ``trimformer_``):

* ``requests_total{endpoint,status}``: answered requests; status 499 means the client left before the answer.
* ``request_duration_seconds{endpoint}``: histogram, request in to response out (auth and parsing included).
* ``tokenization_duration_seconds`` (one call of the tokenizer stage, over every request it took at once),
  ``queue_duration_seconds`` (submit to first model window), ``inference_duration_seconds`` (one model call):
  histograms.
* ``batch_size`` (sequences per model call) and ``batch_tokens`` (valid tokens per model call): histograms.
* ``inputs_total{endpoint}``, ``input_tokens_total{endpoint}``: inputs and tokens of successful requests.
* ``queue_depth`` (sequences waiting), ``queue_requests`` (requests waiting), ``in_flight_requests``: gauges, read
  when rendered (no per-request cost).
* ``cancelled_requests_total``, ``dropped_sequences_total`` (never computed because the client left),
  ``model_errors_total`` (failed model calls), ``rejected_requests_total{reason}`` (429/503/413/422/401...).

Recording from the model worker and tokenizer threads is guarded by one lock; per-request counters are written by the
event loop only (which also renders), without it.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = tuple(float(2**i) for i in range(11))  # 1 .. 1024 sequences
TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 18))  # 16 .. 131072 tokens

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) and not x.is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_text, tuple(labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self.values[()] = 0.0

    def inc(self, labels: Sequence[str] = (), amount: float = 1.0) -> None:
        key = tuple(labels) if labels.__class__ is tuple else tuple(str(v) for v in labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in sorted(self.values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self.value, self.read = 0.0, read

    def lines(self) -> list[str]:
        value = self.read() if self.read is not None else self.value
        return [f"{self.name} {_num(float(value))}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(buckets)
        self.series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, labels: Sequence[str] = ()) -> None:
        key = tuple(labels) if labels.__class__ is tuple else tuple(str(v) for v in labels)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0] * len(self.buckets) + [0.0, 0]
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s[i] += 1
        s[-2] += value
        s[-1] += 1

    def count(self, labels: Sequence[str] = ()) -> int:
        s = self.series.get(tuple(labels))
        return 0 if s is None else s[-1]

    def lines(self) -> list[str]:
        out = []
        for key, s in sorted(self.series.items()):
            running = 0
            for bound, c in zip(self.buckets, s):
                running += c
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labelnames, key, inf)} {s[-1]}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(float(s[-2]))}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {s[-1]}")
        return out


class Metrics:
    """All server metrics; every recording method is thread-safe."""

    def __init__(
        self,
        *,
        in_flight: Callable[[], float] | None = None,
        queue_depth: Callable[[], float] | None = None,
        queue_requests: Callable[[], float] | None = None,
    ) -> None:
        p = "trimformer_"
        self._lock = threading.Lock()
        self.requests = Counter(
            p + "requests_total", "Answered requests by endpoint and HTTP status.", ("endpoint", "status")
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds", "Request latency, in to out.", LATENCY_BUCKETS, ("endpoint",)
        )
        self.tokenization = Histogram(
            p + "tokenization_duration_seconds", "One tokenizer-stage call (requests taken at once).", LATENCY_BUCKETS
        )
        self.queue = Histogram(p + "queue_duration_seconds", "Submit to first model window.", LATENCY_BUCKETS)
        self.inference = Histogram(p + "inference_duration_seconds", "One model call.", LATENCY_BUCKETS)
        self.batch_size = Histogram(p + "batch_size", "Sequences per model call.", SIZE_BUCKETS)
        self.batch_tokens = Histogram(p + "batch_tokens", "Valid tokens per model call.", TOKEN_BUCKETS)
        self.inputs = Counter(p + "inputs_total", "Inputs of successful requests.", ("endpoint",))
        self.input_tokens = Counter(p + "input_tokens_total", "Tokens of successful requests.", ("endpoint",))
        self.queue_depth = Gauge(p + "queue_depth", "Sequences waiting for the model.", queue_depth)
        self.queue_requests = Gauge(
            p + "queue_requests", "Requests with sequences waiting for the model.", queue_requests
        )
        self.in_flight = Gauge(p + "in_flight_requests", "Requests admitted and not yet answered.", in_flight)
        self.cancelled = Counter(p + "cancelled_requests_total", "Requests whose client left before the answer.")
        self.dropped = Counter(p + "dropped_sequences_total", "Sequences never computed because their client left.")
        self.model_errors = Counter(p + "model_errors_total", "Failed model calls.")
        self.rejected = Counter(p + "rejected_requests_total", "Requests refused before the model.", ("reason",))
        self._all = (
            self.requests,
            self.request_duration,
            self.tokenization,
            self.queue,
            self.inference,
            self.batch_size,
            self.batch_tokens,
            self.inputs,
            self.input_tokens,
            self.queue_depth,
            self.queue_requests,
            self.in_flight,
            self.cancelled,
            self.dropped,
            self.model_errors,
            self.rejected,
        )
        self._keys: dict[tuple[str, int], tuple[tuple[str, str], tuple[str]]] = {}

    # ------------------------------------------------------------------ recording
    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request. Called on the event loop only (as :meth:`render`), so it takes no lock."""
        key = self._keys.get((endpoint, status))
        if key is None:
            key = self._keys[(endpoint, status)] = ((endpoint, str(status)), (endpoint,))
        self.requests.inc(key[0])
        self.request_duration.observe(seconds, key[1])

    def served(self, endpoint: str, inputs: int, tokens: int) -> None:
        key = (endpoint,)
        with self._lock:
            self.inputs.inc(key, inputs)
            self.input_tokens.inc(key, tokens)

    def tokenized(self, seconds: float) -> None:
        with self._lock:
            self.tokenization.observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        with self._lock:
            self.queue.observe(seconds)

    def queue_waits(self, seconds: Sequence[float]) -> None:
        """Several requests' submit-to-first-window waits (one model window) under one lock."""
        with self._lock:
            for s in seconds:
                self.queue.observe(s)

    def batch(self, sequences: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(sequences)
            self.batch_tokens.observe(tokens)
            self.inference.observe(seconds)

    def cancelled_request(self) -> None:
        with self._lock:
            self.cancelled.inc()

    def dropped_sequences(self, n: int) -> None:
        with self._lock:
            self.dropped.inc(amount=n)

    def model_error(self) -> None:
        with self._lock:
            self.model_errors.inc()

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejected.inc((reason,))

    # ------------------------------------------------------------------ exposition
    def render(self) -> str:
        """All metrics in Prometheus text format."""
        with self._lock:
            lines = []
            for metric in self._all:
                lines += metric.header() + metric.lines()
        return "\n".join(lines) + "\n"
