"""Request schemas (pydantic) of the OpenAI- and TEI-compatible endpoints, and readable 422 messages.

Bodies are parsed with ``Model.model_validate_json`` (pydantic's own JSON parser); polymorphic fields (``input``,
``inputs``) are validated by hand so a wrong type gets one message that says what is accepted and what was sent,
instead of one error per union member. Unknown fields are ignored (OpenAI clients send ``user``, for example).

The two embedding endpoints take a faster road first (:func:`parse_embedding_call`): orjson, then hand checks that
accept only what the pydantic schema accepts, with the same result; a body off that road (malformed, a wrong type,
an unusual value) is handed to the pydantic schema, so every 422 message and every accepted edge case stays
pydantic's.

Accepted input forms, for both ``/v1/embeddings`` (``input``) and ``/embed`` (``inputs``):

* a string, or a non-empty list of strings: texts, tokenized by the server;
* a non-empty list of integers (one input) or a list of non-empty integer lists: token ids used as they are, so
  they must include the model's special tokens (``[CLS] ... [SEP]`` for BERT), as
  :meth:`trimformer.Encoder.embed_token_ids` takes them. Token-id inputs are never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; without it every body takes the pydantic road
    orjson = None

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

_INPUT_FORMS = "a string, a list of strings, a list of token ids (integers) or a list of token-id lists"


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class ParsedInputs:
    """Inputs of an embedding request: exactly one of ``texts`` and ``token_ids`` is set."""

    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids)


def parse_embedding_inputs(value: Any) -> ParsedInputs:
    """Validate the ``input`` / ``inputs`` field (see the module docstring); ``ValueError`` says what was wrong."""
    if isinstance(value, str):
        return ParsedInputs(texts=[value])
    if not isinstance(value, list):
        raise ValueError(f"must be {_INPUT_FORMS}; got {json_type(value)}")
    if not value:
        raise ValueError("must not be an empty list (send at least one input)")
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"item {i} is {json_type(item)}, but item 0 is a string: send a list of strings only")
        return ParsedInputs(texts=list(value))
    if _is_int(first):
        for i, item in enumerate(value):
            if not _is_int(item):
                raise ValueError(
                    f"item {i} is {json_type(item)}, but item 0 is an integer: a token-id input holds integers only"
                )
        return ParsedInputs(token_ids=[list(value)])
    if isinstance(first, list):
        rows = []
        for i, row in enumerate(value):
            if not isinstance(row, list):
                raise ValueError(f"item {i} is {json_type(row)}, but item 0 is a list: send a list of token-id lists")
            if not row:
                raise ValueError(f"item {i} is an empty token-id list (it must hold the model's special tokens)")
            for j, tok in enumerate(row):
                if not _is_int(tok):
                    raise ValueError(f"item {i}, position {j} is {json_type(tok)}; token ids are integers")
            rows.append(row)
        return ParsedInputs(token_ids=rows)
    raise ValueError(f"must be {_INPUT_FORMS}; got a list whose item 0 is {json_type(first)}")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIEmbeddingRequest(_Request):
    """``POST /v1/embeddings`` (OpenAI schema)."""

    input: Any = Field(description=f"{_INPUT_FORMS}")
    model: StrictStr | None = Field(default=None, description="any name; the served model answers")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, description="only the model's own width is supported")
    user: StrictStr | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> ParsedInputs:
        return parse_embedding_inputs(value)


class EmbedRequest(_Request):
    """``POST /embed`` (TEI schema)."""

    inputs: Any = Field(description=f"{_INPUT_FORMS}")
    normalize: StrictBool = True
    truncate: StrictBool | None = None
    truncation_direction: Literal["right", "Right"] = "right"
    prompt_name: None = Field(default=None, description="prompts are not supported")
    dimensions: StrictInt | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> ParsedInputs:
        return parse_embedding_inputs(value)


class RerankRequest(_Request):
    """``POST /rerank`` (TEI schema): score each ``(query, text)`` pair with a cross-encoder."""

    query: StrictStr
    texts: list[StrictStr] = Field(min_length=1)
    truncate: StrictBool | None = None
    raw_scores: StrictBool = False
    return_text: StrictBool = False


class PredictRequest(_Request):
    """``POST /predict`` (TEI schema): classify texts or text pairs.

    ``inputs`` is a string (one text, answered with one list of labels), or a non-empty list whose items are
    strings or ``[text, text_pair]`` lists (answered with one list of labels per item). Unlike TEI, a bare list of
    two strings is two texts, not one pair: send ``[["a", "b"]]`` for a pair.
    """

    inputs: Any
    truncate: StrictBool | None = None
    raw_scores: StrictBool = False

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> tuple[bool, list[str | tuple[str, str]]]:
        if isinstance(value, str):
            return True, [value]
        if not isinstance(value, list):
            raise ValueError(
                f"must be a string or a list of strings and [text, text_pair] lists; got {json_type(value)}"
            )
        if not value:
            raise ValueError("must not be an empty list (send at least one input)")
        items: list[str | tuple[str, str]] = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                items.append(item)
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
                items.append((item[0], item[1]))
            else:
                raise ValueError(f"item {i} must be a string or a [text, text_pair] list of two strings")
        return False, items


@dataclass(frozen=True)
class EmbeddingCall:
    """A validated ``POST /v1/embeddings`` or ``POST /embed`` request.

    Attributes:
        inputs: the texts or token-id lists.
        encoding_format: ``"float"`` or ``"base64"`` (``/v1/embeddings``; ``/embed`` answers floats).
        dimensions: the requested width, or ``None``.
        normalize: ``/embed``'s flag (default true); ``None`` for ``/v1/embeddings`` (the model's config decides).
        truncate: ``/embed``'s per-request truncation, or ``None`` (the server's default).
    """

    inputs: ParsedInputs
    encoding_format: str = "float"
    dimensions: int | None = None
    normalize: bool | None = None
    truncate: bool | None = None


_MISSING = object()


def _opt(obj: dict, key: str, kind: type) -> object:
    """``obj[key]`` when absent/null or exactly of ``kind``, else ``_MISSING`` (off the fast road)."""
    value = obj.get(key)
    return value if value is None or value.__class__ is kind else _MISSING


def _fast_openai(obj: dict) -> EmbeddingCall | None:
    value = obj.get("input", _MISSING)
    fmt = obj.get("encoding_format", "float")
    if value is _MISSING or fmt.__class__ is not str or fmt not in ("float", "base64"):
        return None
    if _opt(obj, "model", str) is _MISSING or _opt(obj, "user", str) is _MISSING:
        return None
    dims = _opt(obj, "dimensions", int)
    if dims is _MISSING:
        return None
    try:
        inputs = parse_embedding_inputs(value)
    except ValueError:
        return None
    return EmbeddingCall(inputs, fmt, dims)


def _fast_tei(obj: dict) -> EmbeddingCall | None:
    value = obj.get("inputs", _MISSING)
    normalize = obj.get("normalize", True)
    direction = obj.get("truncation_direction", "right")
    truncate, dims = _opt(obj, "truncate", bool), _opt(obj, "dimensions", int)
    if value is _MISSING or normalize.__class__ is not bool or truncate is _MISSING or dims is _MISSING:
        return None
    if direction.__class__ is not str or direction not in ("right", "Right") or obj.get("prompt_name") is not None:
        return None
    try:
        inputs = parse_embedding_inputs(value)
    except ValueError:
        return None
    return EmbeddingCall(inputs, "float", dims, normalize, truncate)


def parse_embedding_call(openai: bool, body: bytes) -> EmbeddingCall:
    """Validate a ``/v1/embeddings`` (``openai``) or ``/embed`` body (see the module docstring).

    Raises:
        pydantic.ValidationError: the body is not a valid request (turn it into a message with
            :func:`validation_message`).
    """
    if orjson is not None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if obj.__class__ is dict:
            call = _fast_openai(obj) if openai else _fast_tei(obj)
            if call is not None:
                return call
    if openai:
        req = OpenAIEmbeddingRequest.model_validate_json(body)
        return EmbeddingCall(req.input, req.encoding_format, req.dimensions)
    tei = EmbedRequest.model_validate_json(body)
    return EmbeddingCall(tei.inputs, "float", tei.dimensions, tei.normalize, tei.truncate)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_message(exc: ValidationError) -> str:
    """One line naming each problem: ``"input: must not be an empty list ...; encoding_format: ..."``."""
    problems = []
    for err in exc.errors(include_url=False):
        kind, loc, msg = err.get("type", ""), _loc(tuple(err.get("loc", ()))), err.get("msg", "")
        if kind == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", msg)
            problems.append(f"request body is not valid JSON ({detail})")
            continue
        if kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
            problems.append(f"request body must be a JSON object, got {json_type(err.get('input'))}")
            continue
        if kind == "missing":
            problems.append(f"{loc}: required field is missing")
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif "input" in err and kind not in ("too_short",):
            msg = f"{msg}, got {json_type(err['input'])}"
        problems.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(problems) or str(exc)
