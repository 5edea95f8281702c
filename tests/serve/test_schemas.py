"""The embedding endpoints' fast parsing road (orjson + hand checks) against the pydantic schemas as the oracle:
every body it accepts gives what pydantic gives, and every body pydantic refuses is refused with pydantic's
message."""

import json

import pytest
from pydantic import ValidationError

from trimformer.serve import schemas
from trimformer.serve.schemas import (
    EmbeddingCall,
    EmbedRequest,
    OpenAIEmbeddingRequest,
    parse_embedding_call,
    validation_message,
)

OPENAI_BODIES = [
    {"input": "hello"},
    {"input": ["a", "b"], "model": "m", "encoding_format": "base64", "user": "u"},
    {"input": [101, 7, 102], "encoding_format": "float", "dimensions": 384},
    {"input": [[101, 102], [101, 5, 102]], "model": None, "dimensions": None, "extra": {"x": 1}},
    {"input": ""},
    # refused: each must get pydantic's own message
    {"input": "a", "encoding_format": "hex"},
    {"input": "a", "encoding_format": None},
    {"input": "a", "dimensions": "384"},
    {"input": "a", "dimensions": 3.0},
    {"input": "a", "dimensions": True},
    {"input": "a", "model": 5},
    {"model": "m"},
    {"input": []},
    {"input": [1.5]},
    {"input": ["a", 3]},
]
TEI_BODIES = [
    {"inputs": "hello"},
    {"inputs": ["a", "b"], "normalize": False, "truncate": True},
    {"inputs": [[101, 102]], "truncate": None, "truncation_direction": "Right", "prompt_name": None},
    {"inputs": [101, 102], "dimensions": 32, "normalize": True},
    # refused
    {"inputs": "a", "normalize": "yes"},
    {"inputs": "a", "normalize": None},
    {"inputs": "a", "truncate": 1},
    {"inputs": "a", "truncation_direction": "left"},
    {"inputs": "a", "prompt_name": "query"},
    {"inputs": [[101, "x"]]},
    {"inputs": [{"text": "a"}]},
    {},
]
RAW = [b'{"input": ', b"[1, 2]", b"null", b'{"input": "a", "foo": NaN}', b'{"input": "a", "dimensions": 1e400}']


def _oracle(openai: bool, body: bytes):
    """What the pydantic schema alone says: an :class:`EmbeddingCall`, or its 422 message."""
    try:
        if openai:
            req = OpenAIEmbeddingRequest.model_validate_json(body)
            return EmbeddingCall(req.input, req.encoding_format, req.dimensions)
        tei = EmbedRequest.model_validate_json(body)
        return EmbeddingCall(tei.inputs, "float", tei.dimensions, tei.normalize, tei.truncate)
    except ValidationError as exc:
        return validation_message(exc)


def _ours(openai: bool, body: bytes):
    try:
        return parse_embedding_call(openai, body)
    except ValidationError as exc:
        return validation_message(exc)


CASES = [(True, json.dumps(b).encode()) for b in OPENAI_BODIES] + [(False, json.dumps(b).encode()) for b in TEI_BODIES]
CASES += [(openai, raw) for raw in RAW for openai in (True, False)]


@pytest.mark.parametrize("openai, body", CASES, ids=[f"{'oa' if o else 'tei'}-{b[:40]!r}" for o, b in CASES])
def test_fast_road_agrees_with_pydantic(openai, body):
    assert _ours(openai, body) == _oracle(openai, body)


def test_valid_bodies_take_the_fast_road(monkeypatch):
    """The accepted forms never reach pydantic (else the road would not be fast)."""
    if schemas.orjson is None:
        pytest.skip("orjson is not installed: every body takes the pydantic road")

    def refuse(*args, **kwargs):
        raise AssertionError("pydantic was called for a body the fast road should accept")

    monkeypatch.setattr(OpenAIEmbeddingRequest, "model_validate_json", refuse)
    monkeypatch.setattr(EmbedRequest, "model_validate_json", refuse)
    for body in OPENAI_BODIES[:5]:
        assert isinstance(parse_embedding_call(True, json.dumps(body).encode()), EmbeddingCall)
    for body in TEI_BODIES[:4]:
        assert isinstance(parse_embedding_call(False, json.dumps(body).encode()), EmbeddingCall)
