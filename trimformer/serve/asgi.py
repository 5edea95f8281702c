"""The ASGI entry point: a lean path for ``POST /v1/embeddings`` and ``POST /embed``, FastAPI for the rest.

One text per request makes the server's per-request Python work the limit (a GPU runs MiniLM at ~19k texts/s), so
the two embedding endpoints skip FastAPI/Starlette: :class:`EmbeddingEndpoint` reads the body straight from the
ASGI ``receive``, validates it with :func:`~trimformer.serve.schemas.parse_embedding_call` (orjson, pydantic only
for what it cannot accept by hand, so the 422 messages are the same), hands the raw texts to the batcher (whose
tokenizer stage tokenizes them with other requests' texts in one call) and writes the answer with orjson.
Everything else (``/rerank``, ``/predict``, ``/health``, ``/info``, ``/metrics``, ``/docs``) goes through
:class:`Gate` (API key, payload limit, per-request metrics) to the FastAPI app. Both roads give the same statuses,
messages, headers and metrics.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time

from pydantic import ValidationError

from trimformer.serve.batcher import Job, ModelError
from trimformer.serve.checks import check_dimensions, check_token_ids, check_truncation, require, too_many
from trimformer.serve.model import EMBED
from trimformer.serve.responses import (
    CLIENT_CLOSED,
    ClientGone,
    ServeError,
    error_body,
    error_response,
    openai_embeddings_body,
    tei_embed_body,
)
from trimformer.serve.schemas import parse_embedding_call, validation_message

logger = logging.getLogger("trimformer.serve")
ENDPOINTS = ("/v1/embeddings", "/embed", "/rerank", "/predict", "/health", "/info", "/metrics")
EMBEDDING_PATHS = ("/v1/embeddings", "/embed")
OPEN_PATHS = ("/health",)
_JSON = (b"content-type", b"application/json")
_UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>'"


# ---------------------------------------------------------------------------------------------------- shared
#: Seconds a request waits for its result before a disconnect watcher starts: most answers come sooner, and a
#: watcher (an asyncio task reading ``receive``) per request costs the event loop more than the rest of the handler.
WATCH_AFTER = 0.05


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _client_left(job: Job, watcher: asyncio.Task) -> None:
    if watcher.cancelled() or watcher.exception() is not None:
        return
    if not job.future.done():  # the client left first: drop its work, wake its handler with ClientGone
        job.cancel()
        job.future.set_exception(ClientGone())


def _watch(job: Job, receive) -> None:
    if not job.future.done():
        # receive() now returns only at disconnect or once the response is complete (then the job is done: no-op)
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(functools.partial(_client_left, job))


async def run_job(state, job: Job, receive):
    """Submit ``job`` to the batcher and wait for its result; :class:`ClientGone` when the client disconnects
    first (the job is cancelled: rows not yet taken are never computed). Call after the request body was read.

    The disconnect watcher starts after :data:`WATCH_AFTER` seconds without a result, so a client that leaves is
    noticed within that delay of leaving or of its request being queued, whichever is later.
    """
    state.batcher.submit(job)
    timer = job.loop.call_later(WATCH_AFTER, _watch, job, receive)
    try:
        return await job.future
    finally:
        timer.cancel()


def _header_values(scope) -> tuple[bytes | None, bytes | None]:
    """``(authorization, content-length)`` header values of a request (``None`` when absent)."""
    auth = length = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            auth = value
        elif name == b"content-length":
            length = value
    return auth, length


def _authorized(value: bytes | None, expected: bytes) -> bool:
    if value is None:
        return False
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + token.strip(), expected)


def _over_limit(value: bytes | None, limit: int) -> int | None:
    """The declared body size when it is over ``limit``, else ``None``."""
    if value is None:
        return None
    try:
        size = int(value)
    except ValueError:
        return None
    return size if size > limit else None


def _too_large_message(size: int, limit: int) -> str:
    return f"request body of {size} bytes or more is over the server's limit of {limit} (--payload-limit)"


class _BodyTooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"request body over {size} bytes")
        self.size = size


# ---------------------------------------------------------------------------------------------------- lean path
class EmbeddingEndpoint:
    """``POST /v1/embeddings`` and ``POST /embed`` as plain ASGI (see the module docstring).

    The order of checks is the API's: API key (401), declared body size (413), admission (503/429), body read
    (413 over ``--payload-limit``), validation (422), model kind and ``dimensions`` (400), input count (413),
    token-id limits (413/422); texts are then tokenized by the batcher's stage, which answers 413 for an over-long
    input without truncation.
    """

    def __init__(self, state) -> None:
        self.state, self.model, self.config = state, state.model, state.config
        key = self.config.api_key
        self._expected = None if key is None else f"Bearer {key}".encode()
        self._limit = self.config.payload_limit

    async def __call__(self, scope, receive, send) -> None:
        start = time.perf_counter()
        path = scope["path"]
        state = self.state
        metrics = state.metrics
        status = 500
        admitted = False
        try:
            auth, length = _header_values(scope)
            if self._expected is not None and not _authorized(auth, self._expected):
                raise ServeError(401, _UNAUTHORIZED, "unauthorized", {"WWW-Authenticate": "Bearer"})
            size = _over_limit(length, self._limit)
            if size is not None:
                raise ServeError(413, _too_large_message(size, self._limit), "payload_too_large")
            state.enter()
            admitted = True
            body = await self._read(receive)
            payload = await self._answer(path, body, receive)
            status = 200
            headers = [_JSON, (b"content-length", b"%d" % len(payload))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
        except ServeError as exc:
            status = exc.status
            if status in (401, 413, 422, 400):
                metrics.reject(exc.kind)
            await self._error(send, path, status, exc.message, exc.kind, exc.headers)
        except ClientGone:
            status = CLIENT_CLOSED
            metrics.cancelled_request()
        except ModelError as exc:
            status = 500
            await self._error(send, path, 500, str(exc), "backend")
        except Exception as exc:  # noqa: BLE001 - answered as 500, the server keeps serving
            logger.error("unexpected error on %s: %s: %s", path, type(exc).__name__, exc)
            status = 500
            await self._error(send, path, 500, f"internal error: {type(exc).__name__}", "backend")
        finally:
            if admitted:
                state.leave()
            metrics.request(path, status, time.perf_counter() - start)

    async def _read(self, receive) -> bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body = message.get("body", b"")
        if len(body) > self._limit:
            raise ServeError(413, _too_large_message(len(body), self._limit), "payload_too_large")
        if not message.get("more_body", False):
            return body
        parts, size = [body], len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:  # bodies sent without Content-Length (chunked) are counted as they come
                raise ServeError(413, _too_large_message(size, self._limit), "payload_too_large")
            parts.append(chunk)
        return b"".join(parts)

    async def _answer(self, path: str, body: bytes, receive) -> bytes:
        """The 200 body for a request body (every refusal raises :class:`ServeError`)."""
        openai = path == "/v1/embeddings"
        model, config = self.model, self.config
        try:
            call = parse_embedding_call(openai, body)
        except ValidationError as exc:
            raise ServeError(422, validation_message(exc), "validation") from None
        require(model, "embedding", path)
        check_dimensions(model, call.dimensions)
        inputs = call.inputs
        too_many(len(inputs), config.max_client_batch_size)
        normalize = model.encoder.default_normalize if openai else call.normalize
        loop = asyncio.get_running_loop()
        if inputs.texts is not None:
            truncate = config.truncate if call.truncate is None else call.truncate
            check = None if truncate else functools.partial(check_truncation, allowed=False, limit=model.max_length)
            job = Job(EMBED, None, None, loop.create_future(), loop, texts=inputs.texts, check=check)
        else:
            check_token_ids(model, inputs.token_ids)
            job = Job(EMBED, inputs.token_ids, None, loop.create_future(), loop)
        job.normalize = normalize
        try:
            vectors = await run_job(self.state, job, receive)
        except ValueError as exc:  # the tokenizer refused the texts
            raise ServeError(422, str(exc), "validation") from None
        self.state.metrics.served(path, len(vectors), job.num_tokens)
        if openai:
            return openai_embeddings_body(vectors, model.model_id, job.num_tokens, call.encoding_format)
        return tei_embed_body(vectors)

    @staticmethod
    async def _error(send, path: str, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        body = error_body(path, status, message, kind)
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        headers = [_JSON, (b"content-length", b"%d" % len(body)), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------- the rest
class Gate:
    """Pure ASGI wrapper of the FastAPI app: bearer-token check (all paths but ``/health``), payload limit
    (declared or counted) and per-request metrics."""

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state
        key = state.config.api_key
        self._expected = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        start = time.perf_counter()
        status, started = [500], [False]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            auth, length = _header_values(scope)
            if self._expected is not None and path not in OPEN_PATHS and not _authorized(auth, self._expected):
                self.state.metrics.reject("unauthorized")
                resp = error_response(path, 401, _UNAUTHORIZED, "unauthorized", {"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send_status)
                return
            limit = self.state.config.payload_limit
            size = _over_limit(length, limit)
            if size is None:
                received = 0

                async def counted_receive():
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
            await error_response(path, 413, _too_large_message(size, limit), "payload_too_large")(
                scope, receive, send_status
            )
        finally:
            self.state.metrics.request(endpoint, status[0], time.perf_counter() - start)


class ServeApp:
    """The server's ASGI application: ``POST`` to an embedding path takes :class:`EmbeddingEndpoint`; every other
    request (and the lifespan) goes through :class:`Gate` to the FastAPI app (``.fastapi``).

    Attributes:
        fastapi: the FastAPI app (docs, ``/rerank``, ``/predict``, ``/health``, ``/info``, ``/metrics``).
        state: ``fastapi.state``; ``state.server`` is the :class:`~trimformer.serve.app.ServerState`.
    """

    def __init__(self, fastapi_app, server_state) -> None:
        self.fastapi = fastapi_app
        self.state = fastapi_app.state
        self.embeddings = EmbeddingEndpoint(server_state)
        self.gate = Gate(fastapi_app, server_state)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST" and scope["path"] in EMBEDDING_PATHS:
                await self.embeddings(scope, receive, send)
            else:
                await self.gate(scope, receive, send)
            return
        await self.fastapi(scope, receive, send)
