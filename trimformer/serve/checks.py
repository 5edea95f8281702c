"""Request checks shared by the lean embedding path and the FastAPI endpoints: each raises
:class:`~trimformer.serve.responses.ServeError` with the status and message the API promises."""

from __future__ import annotations

from trimformer.engine.tokenization import Tokenized
from trimformer.serve.model import ServedModel
from trimformer.serve.responses import ServeError


def too_many(n: int, limit: int, what: str = "inputs") -> None:
    """413 when a request holds more than ``limit`` inputs (``--max-client-batch-size``)."""
    if n > limit:
        raise ServeError(
            413, f"{n} {what} in one request, more than the server's limit of {limit} (--max-client-batch-size)",
            "payload_too_large",
        )  # fmt: skip


def check_truncation(tokens: Tokenized, allowed: bool, limit: int, what: str = "input") -> None:
    """413 when an input was cut to the model's limit and truncation is not allowed for this request."""
    if tokens.truncated and not allowed:
        i = tokens.truncated[0]
        raise ServeError(
            413,
            f"{what} {i} is longer than the model's limit of {limit} tokens ({len(tokens.truncated)} {what}(s) too "
            'long); shorten it, or send "truncate": true (/embed, /rerank, /predict) or start the server with '
            "--truncate",
            "payload_too_large",
        )


def require(model: ServedModel, kind: str, endpoint: str) -> None:
    """400 when ``endpoint`` needs another kind of model (``"embedding"``, ``"classifier"`` or ``"reranker"``)."""
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


def check_dimensions(model: ServedModel, dimensions: int | None) -> None:
    """400 unless ``dimensions`` is absent or the model's own width."""
    if dimensions is not None and dimensions != model.output_width:
        raise ServeError(
            400,
            f"dimensions={dimensions} is not supported: {model.model_id} returns {model.output_width}-dimensional "
            f"embeddings and is not trained for shortened ones (omit dimensions or send {model.output_width})",
            "unsupported",
        )


def check_token_ids(model: ServedModel, rows: list[list[int]]) -> None:
    """413 for a token-id input over the model's length (never truncated), 422 for an id outside the vocabulary."""
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
