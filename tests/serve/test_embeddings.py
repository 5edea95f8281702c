"""Embedding endpoints over real HTTP (the packaged all-MiniLM-L6-v2): the official openai client and httpx get
exactly what ``Encoder.embed`` computes, in every input form and encoding, with the documented normalisation."""

import base64

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.serve.helpers import metric, running

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "",
    "The quick brown fox jumps over the lazy dog, again and again, until it gets tired.",
    "naïve café — ünïcödé ✓ 日本語",
]
LONG = " ".join(["a very long text that will certainly be cut"] * 60)  # > 256 tokens


@pytest.fixture(scope="module")
def server(minilm):
    with running(minilm) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def reference(minilm):
    return minilm.encoder.embed(TEXTS)  # normalised, as the model's sentence-transformers config says


def _close(got, want):
    torch.testing.assert_close(torch.as_tensor(np.asarray(got, dtype=np.float32)), want, rtol=0, atol=2e-6)


def test_openai_client_float_and_base64(server, reference, minilm):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for fmt in ("float", "base64"):
        resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format=fmt)
        assert [d.index for d in resp.data] == list(range(len(TEXTS)))
        rows = [d.embedding for d in resp.data]
        if fmt == "base64":  # asked for explicitly, the client hands the strings over undecoded
            rows = [np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]
        _close(rows, reference)
        assert resp.model == "all-MiniLM-L6-v2"
        n_tokens = minilm.encoder.tokenize(TEXTS).num_tokens
        assert resp.usage.prompt_tokens == resp.usage.total_tokens == n_tokens
    # the client's default (it asks for base64 and decodes it) and a single string
    one = client.embeddings.create(model="x", input=TEXTS[1])
    _close([one.data[0].embedding], reference[1:2])
    assert reference[1] @ reference[0] == pytest.approx(0.7553, abs=1e-4)  # model-card sanity value


def test_base64_is_little_endian_float32(server, reference):
    url, _ = server
    body = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[:2], "encoding_format": "base64"}).json()
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    assert all(r.shape == (384,) for r in rows)
    _close(np.stack(rows), reference[:2])


def test_token_id_inputs(server, reference, minilm):
    url, _ = server
    ids = minilm.encoder.tokenize(TEXTS).input_ids
    both = httpx.post(url + "/v1/embeddings", json={"input": ids}).json()
    _close([d["embedding"] for d in both["data"]], reference)
    one = httpx.post(url + "/embed", json={"inputs": ids[3]}).json()
    _close(one, reference[3:4])


def test_tei_embed_normalize_flag(server, minilm):
    url, _ = server
    raw = minilm.encoder.embed(TEXTS, normalize=False)
    default = httpx.post(url + "/embed", json={"inputs": TEXTS})
    assert default.status_code == 200
    _close(default.json(), F.normalize(raw, dim=-1))  # TEI default: normalize=true
    plain = httpx.post(url + "/embed", json={"inputs": TEXTS, "normalize": False}).json()
    _close(plain, raw)
    assert abs(np.linalg.norm(plain[0]) - 1) > 1e-3  # really not normalised


def test_truncation_default_off_and_per_request(server, minilm):
    url, state = server
    assert state.config.truncate is False
    r = httpx.post(url + "/embed", json={"inputs": ["short", LONG]})
    assert r.status_code == 413
    assert (
        r.json()["error_type"] == "payload_too_large"
        and "input 1 is longer than the model's limit of 256" in (r.json()["error"])
    )
    r = httpx.post(url + "/v1/embeddings", json={"input": LONG})
    assert r.status_code == 413 and "256" in r.json()["error"]["message"]
    ok = httpx.post(url + "/embed", json={"inputs": ["short", LONG], "truncate": True})
    assert ok.status_code == 200
    _close(ok.json(), minilm.encoder.embed(["short", LONG]))  # Encoder.embed truncates to max_length
    too_long_ids = [101] + [1037] * 300 + [102]
    r = httpx.post(url + "/embed", json={"inputs": too_long_ids, "truncate": True})
    assert r.status_code == 413 and "never truncated" in r.json()["error"]


def test_server_wide_truncate(minilm):
    import openai

    with running(minilm, truncate=True) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        resp = client.embeddings.create(model="m", input=[LONG, "x"], encoding_format="float")
        _close([d.embedding for d in resp.data], minilm.encoder.embed([LONG, "x"]))
        assert resp.usage.prompt_tokens == 256 + 3
        assert httpx.post(url + "/embed", json={"inputs": LONG, "truncate": False}).status_code == 413


def test_dimensions(server, reference):
    url, _ = server
    same = httpx.post(url + "/v1/embeddings", json={"input": "A man is eating food.", "dimensions": 384})
    assert same.status_code == 200
    _close([same.json()["data"][0]["embedding"]], reference[:1])
    r = httpx.post(url + "/v1/embeddings", json={"input": "x", "dimensions": 128})
    assert r.status_code == 400
    assert "dimensions=128 is not supported" in r.json()["error"]["message"] and "384" in r.json()["error"]["message"]


def test_classifier_endpoints_refuse_an_embedding_model(server):
    url, _ = server
    r = httpx.post(url + "/rerank", json={"query": "q", "texts": ["a"]})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]
    r = httpx.post(url + "/predict", json={"inputs": "a"})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]


def test_health_info_metrics(server):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == "all-MiniLM-L6-v2" and info["model_dtype"] == "float32" and info["device"] == "cpu"
    assert info["max_input_length"] == 256 and info["max_batch_tokens"] == 16384
    assert info["max_concurrent_requests"] == 512 and info["max_client_batch_size"] == 256
    assert info["model_type"] == {"embedding": {"pooling": "mean", "normalize": True}}
    before = httpx.get(url + "/metrics").text
    for _ in range(3):
        assert httpx.post(url + "/embed", json={"inputs": ["one", "two"]}).status_code == 200
    assert httpx.post(url + "/embed", json={"inputs": 3}).status_code == 422
    resp = httpx.get(url + "/metrics")
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = resp.text
    ok = metric(after, "trimformer_requests_total", endpoint="/embed", status="200")
    assert ok - metric(before, "trimformer_requests_total", endpoint="/embed", status="200") == 3
    bad = metric(after, "trimformer_requests_total", endpoint="/embed", status="422")
    assert bad - metric(before, "trimformer_requests_total", endpoint="/embed", status="422") == 1
    count = metric(after, "trimformer_request_duration_seconds_count", endpoint="/embed")
    assert count - metric(before, "trimformer_request_duration_seconds_count", endpoint="/embed") == 4
    assert (
        metric(after, "trimformer_inputs_total", endpoint="/embed")
        - metric(before, "trimformer_inputs_total", endpoint="/embed")
        == 6
    )
    assert metric(after, "trimformer_batch_size_count") >= 3 and metric(after, "trimformer_batch_tokens_sum") > 0
    assert "trimformer_queue_depth 0" in after and "trimformer_in_flight_requests 0" in after


def test_docs_list_the_embedding_endpoints(server):
    url, _ = server
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    body = {p: paths[p]["post"]["requestBody"]["content"] for p in ("/v1/embeddings", "/embed")}
    schema = {p: content["application/json"]["schema"] for p, content in body.items()}
    assert "input" in schema["/v1/embeddings"]["properties"] and "normalize" in schema["/embed"]["properties"]
    assert "/rerank" in paths and "/predict" in paths
    assert httpx.get(url + "/docs").status_code == 200
