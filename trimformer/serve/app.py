"""The server application: shared state (model, batcher, admission, draining) and the FastAPI app.

Endpoints (see :mod:`trimformer.serve` for the request/response reference):

* ``POST /v1/embeddings``: OpenAI schema; rows normalised as the model's sentence-transformers config says.
* ``POST /embed``: TEI schema; ``normalize`` defaults to true (TEI's behaviour), ``truncate`` to the server's.
* ``POST /rerank``: TEI schema, single-logit cross-encoders: ``query`` + ``texts`` -> scores, best first.
* ``POST /predict``: TEI schema, classifiers: texts or pairs -> ``[{label, score}]``, best first.
* ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus text).

The two embedding endpoints are served by the lean ASGI path of :mod:`trimformer.serve.asgi`; the rest by FastAPI.
A model request goes: auth (401) -> admission (503 while draining, 429 at ``max_concurrent_requests``) -> body
parsing (422) -> input count (413) -> the batcher's tokenizer stage (texts of many requests in one tokenizer call,
off the event loop) -> length check (413 unless truncating) -> the model queue -> response. Whenever the client
disconnects before the answer, its queued rows are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.routing import Route

from trimformer import __version__
from trimformer.engine.tokenization import Tokenized
from trimformer.serve.asgi import ServeApp, run_job
from trimformer.serve.batcher import Batcher, Job, ModelError
from trimformer.serve.checks import check_truncation, require, too_many
from trimformer.serve.config import ServerConfig
from trimformer.serve.metrics import CONTENT_TYPE, Metrics
from trimformer.serve.model import CLASSIFY, EMBED, ServedModel
from trimformer.serve.responses import (
    CLIENT_CLOSED,
    ClientGone,
    ServeError,
    error_response,
    json_response,
    predict_body,
    rerank_body,
    scores_from_logits,
)
from trimformer.serve.schemas import (
    EmbedRequest,
    OpenAIEmbeddingRequest,
    PredictRequest,
    RerankRequest,
    validation_message,
)

logger = logging.getLogger("trimformer.serve")


class ServerState:
    """Everything the endpoints share: model, batcher (tokenizer stage + model worker), metrics, admission and
    draining."""

    def __init__(self, model: ServedModel, config: ServerConfig) -> None:
        self.model, self.config = model, config
        self.in_flight = 0
        self.draining = False
        self.batcher = Batcher(
            self._run,
            config.max_batch_tokens,
            tokenize=model.tokenize,
            tokenizer_threads=config.tokenization_workers,
            warm_thread=model.warm_thread,
        )
        self.metrics = Metrics(
            in_flight=lambda: self.in_flight,
            queue_depth=lambda: self.batcher.queue_depth,
            queue_requests=lambda: self.batcher.queued_jobs,
        )
        self.batcher.metrics = self.metrics
        self._retry = {"Retry-After": str(config.retry_after)}

    def _run(self, kind, input_ids, token_type_ids) -> torch.Tensor:
        return self.model.run(kind, input_ids, token_type_ids, self.config.max_batch_tokens)

    def start(self) -> None:
        """Warm the model (kernels compiled for short and long inputs), then start the tokenizer stage (each
        thread loads its tokenizer first) and the model worker."""
        self.model.load_tokenizer()
        started = time.perf_counter()
        runs = self.model.encoder.warmup(self.config.max_batch_tokens)
        if runs:
            logger.info("model warm-up: %d forwards in %.1f s", runs, time.perf_counter() - started)
        kind = CLASSIFY if self.model.kind == "classifier" else EMBED
        limit = self.model.max_length
        lengths = sorted({min(limit, n) for n in (3, 17, 64, limit)})
        ids = [[1 + (i % 7)] * n for i, n in enumerate(lengths)]
        self._run(kind, ids, None)
        self.batcher.start()

    def close(self, timeout: float | None = None) -> None:
        """Finish queued jobs, then stop the stage and the worker."""
        if not self.batcher.stop(timeout):
            logger.warning("the model worker did not finish within %.0f s", timeout or 0)

    def begin_drain(self) -> None:
        """Stop admitting requests (503); accepted ones go on."""
        self.draining = True

    def enter(self) -> None:
        """Count a model request in flight, or refuse it (503 while draining, 429 at the limit); pair with
        :meth:`leave`."""
        if self.draining:
            self.metrics.reject("draining")
            raise ServeError(503, "the server is shutting down and accepts no new requests", "unavailable", self._retry)
        if self.in_flight >= self.config.max_concurrent_requests:
            self.metrics.reject("overloaded")
            raise ServeError(
                429,
                f"too many concurrent requests (limit {self.config.max_concurrent_requests}); retry later",
                "overloaded",
                self._retry,
            )
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def admit(self):
        """:meth:`enter` ... :meth:`leave` around a request."""
        self.enter()
        try:
            yield
        finally:
            self.leave()


async def _parse(request: Request, schema: type[BaseModel]):
    body = await request.body()
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise ServeError(422, validation_message(exc), "validation") from None


def _add_embedding_docs(app: FastAPI) -> None:
    """List the two lean-path endpoints (not FastAPI routes) in ``/docs`` with their request schemas."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            for path, model, summary in (
                ("/v1/embeddings", OpenAIEmbeddingRequest, "Embeddings (OpenAI schema)"),
                ("/embed", EmbedRequest, "Embeddings (TEI schema)"),
            ):
                body = {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}
                schema.setdefault("paths", {})[path] = {
                    "post": {"summary": summary, "requestBody": body, "responses": {"200": {"description": "OK"}}}
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(model: ServedModel, config: ServerConfig | None = None) -> ServeApp:
    """Build the ASGI application around a loaded model (``.fastapi`` is the FastAPI app, ``.state.server`` the
    :class:`ServerState`). The tokenizer stage and the model worker start with the app's lifespan (uvicorn's
    startup) and stop, after finishing queued work, at its shutdown."""
    config = config or ServerConfig()
    state = ServerState(model, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, state.start)
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.close, config.shutdown_timeout)

    app = FastAPI(title="trimformer", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = state
    serve_app = ServeApp(app, state)
    # reached only when a request bypasses ServeApp's dispatch; registered so other methods get 405, not 404
    for path in ("/v1/embeddings", "/embed"):
        app.router.routes.append(Route(path, serve_app.embeddings, methods=["POST"], include_in_schema=False))
    _add_embedding_docs(app)

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

    async def classify(request: Request, prepare, check) -> tuple[torch.Tensor, int]:
        """Tokenize (in the batcher's stage) and run the classifier, dropping the work if the client leaves."""
        loop = asyncio.get_running_loop()
        job = Job(CLASSIFY, None, None, loop.create_future(), loop, prepare=prepare, check=check)
        try:
            logits = await run_job(state, job, request.receive)
        except ValueError as exc:  # the tokenizer refused the inputs
            raise ServeError(422, str(exc), "validation") from None
        return torch.from_numpy(logits), job.num_tokens

    @app.post("/rerank")
    async def rerank(request: Request) -> Response:
        async with state.admit():
            req = await _parse(request, RerankRequest)
            require(model, "reranker", "/rerank")
            too_many(len(req.texts), config.max_client_batch_size, "texts")
            truncate = config.truncate if req.truncate is None else req.truncate
            prepare = functools.partial(model.tokenize_pairs, [req.query] * len(req.texts), req.texts)
            check = functools.partial(check_truncation, allowed=truncate, limit=model.max_length, what="pair")
            logits, n_tokens = await classify(request, prepare, check)
            scores = scores_from_logits(logits, raw=req.raw_scores, multi_label=False)[:, 0].tolist()
            state.metrics.served("/rerank", len(scores), n_tokens)
            body = rerank_body(scores, req.texts if req.return_text else None)
            return Response(body, media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        async with state.admit():
            req = await _parse(request, PredictRequest)
            require(model, "classifier", "/predict")
            single, items = req.inputs
            too_many(len(items), config.max_client_batch_size)
            truncate = config.truncate if req.truncate is None else req.truncate
            check = functools.partial(check_truncation, allowed=truncate, limit=model.max_length)
            logits, n_tokens = await classify(request, functools.partial(_tokenize_mixed, items), check)
            c = model.classifier
            multi = c.problem_type == "multi_label_classification"
            scores = scores_from_logits(logits, raw=req.raw_scores, multi_label=multi)
            state.metrics.served("/predict", len(items), n_tokens)
            return Response(predict_body(scores, c.id2label, single), media_type="application/json")

    def _tokenize_mixed(items: list) -> Tokenized:
        """Texts and ``(text, pair)`` items of one /predict request, tokenized in one stage task."""
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
            "workers": config.workers,
            "auth": config.api_key is not None,
            "version": __version__,
        }
        return json_response(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return serve_app
