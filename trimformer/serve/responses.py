"""Response bodies: embeddings as JSON floats or base64, classifier scores, and the two error shapes.

Bodies are serialized here, once, to bytes (no FastAPI ``jsonable_encoder`` walk over thousands of floats), with
orjson when it is installed (float32 rows written straight from the numpy buffer, as the shortest literal that reads
back to the same float32) and the standard ``json`` module otherwise (float32 values as exact float64 literals).
Errors take the shape clients of each API expect:

* under ``/v1/`` (OpenAI): ``{"error": {"message": ..., "type": ..., "param": null, "code": ...}}``;
* elsewhere (TEI): ``{"error": ..., "error_type": ...}``.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import torch
from starlette.responses import Response

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the json fallback keeps a bare install working
    orjson = None

#: Not a real HTTP status: nginx's "client closed request", recorded when the client left before the answer.
CLIENT_CLOSED = 499

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ServeError(Exception):
    """An error answered with ``status``: ``kind`` is a short machine-readable reason (``validation``,
    ``payload_too_large``, ``overloaded``, ``unavailable``, ``backend``, ``unauthorized``, ``unsupported``)."""

    def __init__(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class ClientGone(Exception):
    """The client disconnected before its answer; its work was dropped."""


def dumps(body: object) -> bytes:
    """Compact JSON bytes of plain Python data (orjson when installed)."""
    if orjson is not None:
        return orjson.dumps(body)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> object:
    """Parse JSON bytes (orjson when installed; ``ValueError`` for malformed JSON either way)."""
    if orjson is not None:
        return orjson.loads(data)
    return json.loads(data)


def json_response(body: object, status: int = 200) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json")


def error_response(path: str, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    """The error response for ``path``'s API family (see the module docstring)."""
    resp = Response(error_body(path, status, message, kind), status_code=status, media_type="application/json")
    resp.headers.update(headers or {})
    return resp


def error_body(path: str, status: int, message: str, kind: str) -> bytes:
    """The error body for ``path``'s API family (see the module docstring)."""
    if path.startswith("/v1/"):
        body: dict = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "server_error"),
                "param": None,
                "code": kind,
            }
        }
    else:
        body = {"error": message, "error_type": kind}
    return dumps(body)


def _float32(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = vectors.numpy() if isinstance(vectors, torch.Tensor) else vectors
    if arr.dtype == _F32 and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=_F32)


_F32 = np.dtype("<f4")


def _float_rows(arr: np.ndarray) -> list[bytes]:
    """Each row of ``[N, D]`` float32 as a JSON array."""
    if orjson is not None:
        opt = orjson.OPT_SERIALIZE_NUMPY
        return [orjson.dumps(row, option=opt) for row in arr]
    encode = json.JSONEncoder(separators=(",", ":")).encode
    return [encode(row).encode() for row in arr.tolist()]


def openai_embeddings_body(
    vectors: torch.Tensor | np.ndarray, model_id: str, prompt_tokens: int, encoding_format: str
) -> bytes:
    """``POST /v1/embeddings`` answer for ``[N, D]`` float32 rows (``base64``: little-endian float32 bytes)."""
    arr = _float32(vectors)
    if encoding_format == "base64":
        rows = [b'"' + base64.b64encode(r.tobytes()) + b'"' for r in arr]
    else:
        rows = _float_rows(arr)
    data = b",".join(b'{"object":"embedding","index":%d,"embedding":%s}' % (i, row) for i, row in enumerate(rows))
    return b'{"object":"list","data":[%s],"model":%s,"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (
        data,
        dumps(model_id),
        prompt_tokens,
        prompt_tokens,
    )


def tei_embed_body(vectors: torch.Tensor | np.ndarray) -> bytes:
    """``POST /embed`` answer: a JSON list of float lists."""
    arr = _float32(vectors)
    if orjson is not None:
        return orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)
    return b"[" + b",".join(_float_rows(arr)) + b"]"


def scores_from_logits(logits: torch.Tensor, *, raw: bool, multi_label: bool) -> torch.Tensor:
    """Scores of ``[N, L]`` float32 logits: raw logits, else sigmoid (``L == 1`` or multi-label) or softmax."""
    if raw:
        return logits
    if logits.shape[1] == 1 or multi_label:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def predict_body(scores: torch.Tensor, labels: tuple[str, ...], single: bool) -> bytes:
    """``POST /predict`` answer: per input, ``[{"label", "score"}]`` sorted by score (best first)."""
    out = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda j: -row[j])
        out.append([{"label": labels[j], "score": row[j]} for j in order])
    return dumps(out[0] if single else out)


def rerank_body(scores: list[float], texts: list[str] | None) -> bytes:
    """``POST /rerank`` answer: ``[{"index", "score"(, "text")}]`` sorted by score (best first)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out = []
    for i in order:
        item: dict = {"index": i, "score": scores[i]}
        if texts is not None:
            item["text"] = texts[i]
        out.append(item)
    return dumps(out)
