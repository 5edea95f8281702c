"""HTTP serving: an OpenAI- and TEI-compatible embedding server with token-budget dynamic batching.

Start it with ``trimformer serve`` (or :func:`~trimformer.serve.server.run_server`); build the app alone with
:func:`~trimformer.serve.app.create_app`.

Endpoints
---------
``POST /v1/embeddings`` (OpenAI): ``{"input": str | [str] | [int] | [[int]], "model": str?,
"encoding_format": "float" | "base64", "dimensions": int?}`` -> ``{"object": "list", "data": [{"object":
"embedding", "index": i, "embedding": [...] | "<base64 float32>"}], "model": ..., "usage": {"prompt_tokens": n,
"total_tokens": n}}``. An empty string is embedded as the model's special tokens alone (as ``Encoder.embed``).
Rows are L2-normalised exactly when the model's sentence-transformers config has a Normalize module (what
``Encoder.embed`` does by default); ``dimensions`` other than the model's width is refused (400); over-long inputs
follow the server's ``--truncate`` / ``--no-truncate``; ``model`` may be any name (the served model answers).

``POST /embed`` (TEI): ``{"inputs": same forms, "normalize": bool = true, "truncate": bool?}`` -> ``[[...], ...]``.
As in TEI, ``normalize`` defaults to true whatever the model's config says; ``false`` gives the raw pooled vectors.

``POST /rerank`` (TEI, single-logit cross-encoders): ``{"query": str, "texts": [str], "raw_scores": false,
"return_text": false, "truncate": bool?}`` -> ``[{"index", "score"(, "text")}]``, best first; scores are
``sigmoid(logit)`` unless ``raw_scores``.

``POST /predict`` (TEI, classifiers): ``{"inputs": str | [str | [text, pair]], "raw_scores": false,
"truncate": bool?}`` -> ``[{"label", "score"}]`` per input, best first (a bare string input gets one flat list);
scores are softmax probabilities (sigmoid for one label or ``problem_type`` multi-label) unless ``raw_scores``.

``GET /health`` (never needs the API key; 503 while draining), ``GET /info`` (model, dtype, device, limits),
``GET /metrics`` (Prometheus text, see :mod:`trimformer.serve.metrics`).

Failures
--------
401 without ``Authorization: Bearer <key>`` when started with ``--api-key``; 422 for malformed JSON, wrong types
or an empty input list (the message names the field and what was wrong); 413 for a body over ``--payload-limit``
bytes, more inputs than ``--max-client-batch-size`` or an input over the model's length without truncation; 429
with ``Retry-After`` at ``--max-concurrent-requests``; 503 while draining after SIGTERM; 500 when the model call
holding the request failed (its batchmates are re-run alone, so they are unaffected). Errors under ``/v1/`` have
OpenAI's shape (``{"error": {"message", "type", "code"}}``), the others TEI's (``{"error", "error_type"}``).

Performance
-----------
The two embedding endpoints skip FastAPI (:mod:`trimformer.serve.asgi`); the batcher's tokenizer stage tokenizes
the texts of all waiting requests in one call and the model worker resolves a window's requests with one event-loop
callback (:mod:`trimformer.serve.batcher`); uvicorn runs on uvloop and httptools when installed. One process tops
out at one core of per-request Python work; ``--workers N`` runs N processes on one socket, each with its own model
copy (limits and ``/metrics`` per worker).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Lazy: `trimformer --help` and every other subcommand build the `serve` parser from `serve.config`, which must not
# pull in FastAPI/uvicorn (a GPU box running benchmarks may not have them).
_LAZY = {
    "create_app": "trimformer.serve.app",
    "ServerConfig": "trimformer.serve.config",
    "ServedModel": "trimformer.serve.model",
    "build_server": "trimformer.serve.server",
    "run_server": "trimformer.serve.server",
}

if TYPE_CHECKING:
    from trimformer.serve.app import create_app  # noqa: F401
    from trimformer.serve.config import ServerConfig  # noqa: F401
    from trimformer.serve.model import ServedModel  # noqa: F401
    from trimformer.serve.server import build_server, run_server  # noqa: F401

__all__ = ["ServedModel", "ServerConfig", "build_server", "create_app", "run_server"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trimformer.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
