"""The FastAPI application: OpenAI- and TEI-compatible endpoints over one batched model.

Endpoints (see :mod:`trimformer.serve` for the request/response reference):

* ``POST /v1/embeddings``: OpenAI schema; rows normalised as the model's sentence-transformers config says.
* ``POST /embed``: TEI schema; ``normalize`` defaults to true (TEI's behaviour), ``truncate`` to the server's.
* ``POST /rerank``: TEI schema, single-logit cross-encoders: ``query`` + ``texts`` -> scores, best first.
* ``POST /predict``: TEI schema, classifiers: texts or pairs -> ``[{label, score}]``, best first.
* ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus text).

A model request goes: auth (401) -> admission (503 while draining, 429 at ``max_concurrent_requests``) -> body
parsing (422) -> input count (413) -> tokenization in the thread pool -> length check (413 unless truncating) ->
the batcher's queue -> response. Whenever the client disconnects before the answer, its queued rows are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from trimformer import __version__
from trimformer.engine.tokenization import Tokenized
from trimformer.serve.batcher import Batcher, Job, ModelError
from trimformer.serve.config import ServerConfig
from trimformer.serve.metrics import CONTENT_TYPE, Metrics
from trimformer.serve.model import CLASSIFY, EMBED, ServedModel
from trimformer.serve.responses import (
    CLIENT_CLOSED,
    ClientGone,
    ServeError,
    error_response,
    json_response,
    openai_embeddings_body,
    predict_body,
    rerank_body,
    scores_from_logits,
    tei_embed_body,
)
from trimformer.serve.schemas import (
    EmbedRequest,
    OpenAIEmbeddingRequest,
    ParsedInputs,
    PredictRequest,
    RerankRequest,
    validation_message,
)

logger = logging.getLogger("trimformer.serve")
ENDPOINTS = ("/v1/embeddings", "/embed", "/rerank", "/predict", "/health", "/info", "/metrics")
OPEN_PATHS = ("/health",)
R = TypeVar("R", bound=BaseModel)


class ServerState:
    """Everything the endpoints share: model, batcher, tokenizer pool, metrics, admission and draining."""

    def __init__(self, model: ServedModel, config: ServerConfig) -> None:
        self.model, self.config = model, config
        self.in_flight = 0
        self.draining = False
        self.metrics = Metrics(in_flight=lambda: self.in_flight)
        self.batcher = Batcher(self._run, config.max_batch_tokens, metrics=self.metrics)
        self.executor: ThreadPoolExecutor | None = None

    def _run(self, kind, input_ids, token_type_ids) -> torch.Tensor:
        return self.model.run(kind, input_ids, token_type_ids, self.config.max_batch_tokens)

    def start(self) -> None:
        """Warm the model (kernels compiled for short and long inputs), start the tokenizer pool and the worker."""
        n = self.config.tokenization_workers
        self.model.load_tokenizer()
        self.executor = ThreadPoolExecutor(n, thread_name_prefix="trimformer-tokenize")
        barrier = threading.Barrier(n)

        def warm() -> None:  # one task per thread: the barrier keeps a thread from taking two
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=30)
            self.model.warm_thread()

        for f in [self.executor.submit(warm) for _ in range(n)]:
            f.result()
        kind = CLASSIFY if self.model.kind == "classifier" else EMBED
        limit = self.model.max_length
        lengths = sorted({min(limit, n) for n in (3, 17, 64, limit)})
        ids = [[1 + (i % 7)] * n for i, n in enumerate(lengths)]
        self._run(kind, ids, None)
        self.batcher.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish queued jobs, then stop the worker and the pool."""
        if not self.batcher.stop(timeout):
            logger.warning("the model worker did not finish within %.0f s", timeout or 0)
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def begin_drain(self) -> None:
        """Stop admitting requests (503); accepted ones go on."""
        self.draining = True

    @contextlib.asynccontextmanager
    async def admit(self):
        """Count a model request in flight, or refuse it (503 while draining, 429 at the limit)."""
        retry = {"Retry-After": str(self.config.retry_after)}
        if self.draining:
            self.metrics.reject("draining")
            raise ServeError(503, "the server is shutting down and accepts no new requests", "unavailable", retry)
        if self.in_flight >= self.config.max_concurrent_requests:
            self.metrics.reject("overloaded")
            raise ServeError(
                429,
                f"too many concurrent requests (limit {self.config.max_concurrent_requests}); retry later",
                "overloaded",
                retry,
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class _DisconnectWatch:
    """Runs awaitables until they finish or the client disconnects (then :class:`ClientGone`)."""

    def __init__(self, request: Request) -> None:
        self._task = asyncio.ensure_future(self._wait(request.receive))

    @staticmethod
    async def _wait(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def run(self, awaitable, on_disconnect=None):
        fut = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({fut, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        if on_disconnect is not None:
            on_disconnect()
        fut.cancel()
        raise ClientGone()

    def close(self) -> None:
        self._task.cancel()


async def _parse(request: Request, schema: type[R]) -> R:
    body = await request.body()
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise ServeError(422, validation_message(exc), "validation") from None


def _too_many(n: int, limit: int, what: str = "inputs") -> None:
    if n > limit:
        raise ServeError(
            413, f"{n} {what} in one request, more than the server's limit of {limit} (--max-client-batch-size)",
            "payload_too_large",
        )  # fmt: skip


def _check_truncation(tokens: Tokenized, allowed: bool, limit: int, what: str = "input") -> None:
    if tokens.truncated and not allowed:
        i = tokens.truncated[0]
        raise ServeError(
            413,
            f"{what} {i} is longer than the model's limit of {limit} tokens ({len(tokens.truncated)} {what}(s) too "
            'long); shorten it, or send "truncate": true (/embed, /rerank, /predict) or start the server with '
            "--truncate",
            "payload_too_large",
        )


def _require(model: ServedModel, kind: str, endpoint: str) -> None:
    if kind == "embedding" and model.kind != "embedding":
        raise ServeError(
            400, f"model {model.model_id!r} is a sequence classifier; {endpoint} needs an embedding model "
            "(use /predict or /rerank)", "unsupported",
        )  # fmt: skip
    if kind in ("classifier", "reranker") and model.kind != "classifier":
        raise ServeError(
            400, f"model {model.model_id!r} is an embedding model; {endpoint} needs a sequence-classification "
            "checkpoint (*ForSequenceClassification)", "unsupported",
        )  # fmt: skip
    if kind == "reranker" and not model.is_reranker:
        raise ServeError(
            400, f"model {model.model_id!r} is not a reranker: /rerank needs a classifier with one label "
            f"(this one has {model.output_width}); use /predict", "unsupported",
        )  # fmt: skip


def _check_dimensions(model: ServedModel, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != model.output_width:
        raise ServeError(
            400,
            f"dimensions={dimensions} is not supported: {model.model_id} returns {model.output_width}-dimensional "
            f"embeddings and is not trained for shortened ones (omit dimensions or send {model.output_width})",
            "unsupported",
        )


def create_app(model: ServedModel, config: ServerConfig | None = None) -> FastAPI:
    """Build the application around a loaded model. The model worker and the tokenizer pool start with the app's
    lifespan (uvicorn's startup) and stop, after finishing queued work, at its shutdown."""
    config = config or ServerConfig()
    state = ServerState(model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, state.start)
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close, config.shutdown_timeout)

    app = FastAPI(
        title="trimformer",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.server = state

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Response:
        if exc.status in (401, 413, 422, 400):
            state.metrics.reject(exc.kind)
        return error_response(request.url.path, exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        state.metrics.cancelled_request()
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(ModelError)
    async def _model_error(request: Request, exc: ModelError) -> Response:
        return error_response(request.url.path, 500, str(exc), "backend")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.error("unexpected error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}", "backend")

    async def tokenize(fn, *args) -> Tokenized:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(state.executor, fn, *args)
        except ValueError as exc:
            raise ServeError(422, str(exc), "validation") from None
        state.metrics.tokenized(time.perf_counter() - t0)
        return out

    async def compute(request: Request, kind: str, make_tokens, check_ids=None) -> tuple[torch.Tensor, Tokenized]:
        """Tokenize (in the pool) and run the batched model, dropping the work if the client leaves."""
        watch = _DisconnectWatch(request)
        try:
            tokens = await watch.run(make_tokens())
            if check_ids is not None:
                check_ids(tokens)
            loop = asyncio.get_running_loop()
            job = Job(kind, tokens.input_ids, tokens.token_type_ids, loop.create_future(), loop)
            result = await watch.run(_submit(job), on_disconnect=job.cancel)
            return result, tokens
        finally:
            watch.close()

    async def _submit(job: Job) -> torch.Tensor:
        return await state.batcher.submit(job)

    async def embed(request: Request, inputs: ParsedInputs, truncate: bool) -> tuple[torch.Tensor, int]:
        _too_many(len(inputs), config.max_client_batch_size)
        if inputs.texts is not None:
            texts = inputs.texts

            async def make():
                return await tokenize(model.tokenize, texts)

            def check(tokens: Tokenized) -> None:
                _check_truncation(tokens, truncate, model.max_length)

        else:
            _check_token_ids(inputs.token_ids)

            async def make():
                return Tokenized(inputs.token_ids, None, ())

            check = None
        vectors, tokens = await compute(request, EMBED, make, check)
        return vectors, tokens.num_tokens

    def _check_token_ids(rows: list[list[int]]) -> None:
        limit, vocab = model.max_length, model.vocab_size
        for i, ids in enumerate(rows):
            if len(ids) > limit:
                raise ServeError(
                    413, f"input {i} has {len(ids)} token ids, more than the model's limit of {limit} "
                    "(token-id inputs are never truncated)", "payload_too_large",
                )  # fmt: skip
            lo, hi = min(ids), max(ids)
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise ServeError(422, f"input {i} has token id {bad} outside [0, {vocab})", "validation")

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> Response:
        async with state.admit():
            req = await _parse(request, OpenAIEmbeddingRequest)
            _require(model, "embedding", "/v1/embeddings")
            _check_dimensions(model, req.dimensions)
            vectors, n_tokens = await embed(request, req.input, config.truncate)
            if model.encoder.default_normalize:
                vectors = F.normalize(vectors, p=2.0, dim=-1)
            state.metrics.served("/v1/embeddings", len(vectors), n_tokens)
            body = openai_embeddings_body(vectors, model.model_id, n_tokens, req.encoding_format)
            return Response(body, media_type="application/json")

    @app.post("/embed")
    async def tei_embed(request: Request) -> Response:
        async with state.admit():
            req = await _parse(request, EmbedRequest)
            _require(model, "embedding", "/embed")
            _check_dimensions(model, req.dimensions)
            truncate = config.truncate if req.truncate is None else req.truncate
            vectors, n_tokens = await embed(request, req.inputs, truncate)
            if req.normalize:
                vectors = F.normalize(vectors, p=2.0, dim=-1)
            state.metrics.served("/embed", len(vectors), n_tokens)
            return Response(tei_embed_body(vectors), media_type="application/json")

    @app.post("/rerank")
    async def rerank(request: Request) -> Response:
        async with state.admit():
            req = await _parse(request, RerankRequest)
            _require(model, "reranker", "/rerank")
            _too_many(len(req.texts), config.max_client_batch_size, "texts")
            truncate = config.truncate if req.truncate is None else req.truncate

            async def make():
                return await tokenize(model.tokenize_pairs, [req.query] * len(req.texts), req.texts)

            def check(tokens: Tokenized) -> None:
                _check_truncation(tokens, truncate, model.max_length, "pair")

            logits, tokens = await compute(request, CLASSIFY, make, check)
            scores = scores_from_logits(logits, raw=req.raw_scores, multi_label=False)[:, 0].tolist()
            state.metrics.served("/rerank", len(scores), tokens.num_tokens)
            body = rerank_body(scores, req.texts if req.return_text else None)
            return Response(body, media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        async with state.admit():
            req = await _parse(request, PredictRequest)
            _require(model, "classifier", "/predict")
            single, items = req.inputs
            _too_many(len(items), config.max_client_batch_size)
            truncate = config.truncate if req.truncate is None else req.truncate

            async def make():
                return await tokenize(_tokenize_mixed, items)

            def check(tokens: Tokenized) -> None:
                _check_truncation(tokens, truncate, model.max_length)

            logits, tokens = await compute(request, CLASSIFY, make, check)
            c = model.classifier
            multi = c.problem_type == "multi_label_classification"
            scores = scores_from_logits(logits, raw=req.raw_scores, multi_label=multi)
            state.metrics.served("/predict", len(items), tokens.num_tokens)
            return Response(predict_body(scores, c.id2label, single), media_type="application/json")

    def _tokenize_mixed(items: list) -> Tokenized:
        """Texts and ``(text, pair)`` items of one /predict request, tokenized in one pool task."""
        singles = [i for i, x in enumerate(items) if isinstance(x, str)]
        pairs = [i for i, x in enumerate(items) if not isinstance(x, str)]
        ids: list = [None] * len(items)
        types: list = [None] * len(items)
        truncated: list[int] = []
        if singles:
            tok = model.tokenize([items[i] for i in singles])
            for j, i in enumerate(singles):
                ids[i], types[i] = tok.input_ids[j], [0] * len(tok.input_ids[j])
            truncated += [singles[j] for j in tok.truncated]
        if pairs:
            tok = model.tokenize_pairs([items[i][0] for i in pairs], [items[i][1] for i in pairs])
            for j, i in enumerate(pairs):
                ids[i], types[i] = tok.input_ids[j], tok.token_type_ids[j]
            truncated += [pairs[j] for j in tok.truncated]
        return Tokenized(ids, types if pairs else None, tuple(sorted(truncated)))

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return json_response({"status": "draining"}, 503)
        return json_response({"status": "ok"})

    @app.get("/info")
    async def info() -> Response:
        body = {
            **model.info(),
            "max_batch_tokens": config.max_batch_tokens,
            "max_concurrent_requests": config.max_concurrent_requests,
            "max_client_batch_size": config.max_client_batch_size,
            "auto_truncate": config.truncate,
            "tokenization_workers": config.tokenization_workers,
            "auth": config.api_key is not None,
            "version": __version__,
        }
        return json_response(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_GateMiddleware, state=state)
    return app


class _BodyTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"request body over {size} bytes")
        self.size = size


class _GateMiddleware:
    """Pure ASGI middleware: bearer-token check (all paths but ``/health``), declared body size and per-request
    metrics."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state
        key = state.config.api_key
        self._expected = None if key is None else f"Bearer {key}".encode()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + token.strip(), self._expected)
        return False

    def _too_large(self, scope) -> int | None:
        """The declared body size when it is over ``payload_limit``, else ``None``."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return None
                return size if size > self.state.config.payload_limit else None
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        start = time.perf_counter()
        status, started = [500], [False]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            if self._expected is not None and path not in OPEN_PATHS and not self._authorized(scope):
                self.state.metrics.reject("unauthorized")
                resp = error_response(
                    path, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "unauthorized",
                    {"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                await resp(scope, receive, send_status)
                return
            limit = self.state.config.payload_limit
            size = self._too_large(scope)
            if size is None:
                received = 0

                async def counted_receive():  # bodies sent without Content-Length (chunked) are counted as they come
                    nonlocal received
                    message = await receive()
                    if message["type"] == "http.request":
                        received += len(message.get("body", b""))
                        if received > limit:
                            raise _BodyTooLarge(received)
                    return message

                try:
                    await self.app(scope, counted_receive, send_status)
                    return
                except _BodyTooLarge as exc:
                    if started[0]:
                        raise
                    size = exc.size
            self.state.metrics.reject("payload_too_large")
            message = f"request body of {size} bytes or more is over the server's limit of {limit} (--payload-limit)"
            await error_response(path, 413, message, "payload_too_large")(scope, receive, send_status)
        finally:
            self.state.metrics.request(endpoint, status[0], time.perf_counter() - start)
