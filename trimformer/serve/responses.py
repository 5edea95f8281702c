"""Response bodies: embeddings as JSON floats or base64, classifier scores, and the two error shapes.

Bodies are serialized here, once, to bytes (no FastAPI ``jsonable_encoder`` walk over thousands of floats).
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


def json_response(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json")


def error_response(path: str, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
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
    resp = json_response(body, status)
    resp.headers.update(headers or {})
    return resp


def _float_rows(vectors: torch.Tensor) -> list[str]:
    """Each row of ``[N, D]`` float32 as a JSON array (float32 values written as exact float64 literals)."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    return [dumps(row) for row in vectors.tolist()]


def openai_embeddings_body(vectors: torch.Tensor, model_id: str, prompt_tokens: int, encoding_format: str) -> bytes:
    """``POST /v1/embeddings`` answer for ``[N, D]`` float32 rows (``base64``: little-endian float32 bytes)."""
    if encoding_format == "base64":
        arr = np.ascontiguousarray(vectors.numpy(), dtype="<f4")
        rows = ['"' + base64.b64encode(r.tobytes()).decode("ascii") + '"' for r in arr]
    else:
        rows = _float_rows(vectors)
    data = ",".join(f'{{"object":"embedding","index":{i},"embedding":{row}}}' for i, row in enumerate(rows))
    usage = f'{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}'
    return f'{{"object":"list","data":[{data}],"model":{json.dumps(model_id)},"usage":{usage}}}'.encode()


def tei_embed_body(vectors: torch.Tensor) -> bytes:
    """``POST /embed`` answer: a JSON list of float lists."""
    return ("[" + ",".join(_float_rows(vectors)) + "]").encode()


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
    return json.dumps(out[0] if single else out, separators=(",", ":")).encode()


def rerank_body(scores: list[float], texts: list[str] | None) -> bytes:
    """``POST /rerank`` answer: ``[{"index", "score"(, "text")}]`` sorted by score (best first)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out = []
    for i in order:
        item: dict = {"index": i, "score": scores[i]}
        if texts is not None:
            item["text"] = texts[i]
        out.append(item)
    return json.dumps(out, separators=(",", ":")).encode()
