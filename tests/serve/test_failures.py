"""Every failure the server promises, over real HTTP: 422 with a message naming what was wrong, 413, 429 with
Retry-After, 401, 500 for the failing request only (batchmates unaffected, server keeps serving), and a client
that disconnects: its queued work is never computed."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from tests.serve.helpers import metric, running
from trimformer.serve import ServedModel

GATE, POISON, GONE = 2001, 2002, 2003  # token ids that the patched forward reacts to


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return ServedModel.load(tiny_dir, device="cpu", dtype="float32")


class PatchedForward:
    """Wraps ``EncoderModel.forward_packed``: records every batch, blocks while a GATE token is in it (until
    ``release()``), raises for a POISON token."""

    def __init__(self, original):
        self.original = original
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []

    def __call__(self, batch):
        ids = batch.input_ids.tolist()
        self.batches.append(ids)
        if GATE in ids:
            self.entered.set()
            assert self.open.wait(60), "gate never released"
        if POISON in ids:
            raise RuntimeError("injected failure for a marked input")
        return self.original(batch)

    def release(self):
        self.open.set()


@pytest.fixture
def patched(tiny, monkeypatch):
    wrapper = PatchedForward(tiny.encoder.model.forward_packed)
    monkeypatch.setattr(tiny.encoder.model, "forward_packed", wrapper)
    yield wrapper
    wrapper.release()


def _ids(*middle):
    return [101, *middle, 102]


BAD_BODIES = [
    ("/v1/embeddings", b'{"input": ', "request body is not valid JSON"),
    ("/embed", b"[1, 2]", "request body must be a JSON object, got a list"),
    ("/v1/embeddings", {"input": 5}, "input: must be a string, a list of strings, a list of token ids"),
    ("/v1/embeddings", {"input": []}, "input: must not be an empty list"),
    ("/embed", {"inputs": ["a", 3]}, "inputs: item 1 is an integer, but item 0 is a string"),
    ("/embed", {"inputs": [101, True]}, "inputs: item 1 is a boolean, but item 0 is an integer"),
    ("/embed", {"inputs": [[101, 102], []]}, "inputs: item 1 is an empty token-id list"),
    ("/embed", {"inputs": [[101, "x"]]}, "inputs: item 0, position 1 is a string; token ids are integers"),
    ("/embed", {"inputs": [{"text": "a"}]}, "got a list whose item 0 is an object"),
    ("/embed", {"inputs": [[101, 99999, 102]]}, "input 0 has token id 99999 outside [0, 30522)"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, "encoding_format: Input should be 'float' or"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, "normalize: Input should be a valid boolean, got a string"),
    ("/embed", {"inputs": "a", "truncation_direction": "left"}, "truncation_direction: Input should be"),
    ("/v1/embeddings", {"model": "m"}, "input: required field is missing"),
    ("/v1/embeddings", {"input": "a", "dimensions": "384"}, "dimensions: Input should be a valid integer"),
]


@pytest.mark.parametrize("path, body, message", BAD_BODIES, ids=[m[:30] for _, _, m in BAD_BODIES])
def test_bad_requests_get_422_saying_what_was_wrong(tiny, path, body, message, request):
    server = request.getfixturevalue("_tiny_server")
    url = server + path
    r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    text = err["message"] if path.startswith("/v1/") else err
    assert message in text, text
    if path.startswith("/v1/"):
        assert r.json()["error"]["type"] == "invalid_request_error"
    else:
        assert r.json()["error_type"] == "validation"


@pytest.fixture(scope="module")
def _tiny_server(tiny):
    with running(tiny, max_client_batch_size=4) as (url, _):
        yield url


def test_openai_client_sees_the_422_message(_tiny_server):
    import openai

    client = openai.OpenAI(base_url=_tiny_server + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError, match="must not be an empty list"):
        client.embeddings.create(model="m", input=[])


def test_too_many_inputs_413(_tiny_server):
    r = httpx.post(_tiny_server + "/embed", json={"inputs": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 413
    assert "5 inputs in one request, more than the server's limit of 4" in r.json()["error"]
    assert httpx.post(_tiny_server + "/embed", json={"inputs": ["a", "b", "c", "d"]}).status_code == 200


def test_body_over_the_payload_limit_413(tiny):
    with running(tiny, payload_limit=1000) as (url, _):
        r = httpx.post(url + "/embed", json={"inputs": ["x" * 600, "y" * 600]})
        assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
        assert "over the server's limit of 1000 (--payload-limit)" in r.json()["error"]
        r = httpx.post(url + "/v1/embeddings", json={"input": "z" * 2000})
        assert r.status_code == 413 and "1000" in r.json()["error"]["message"]
        chunks = (part for part in [b'{"inputs": ["', b"w" * 700, b'", "', b"v" * 700, b'"]}'])  # no Content-Length
        r = httpx.post(url + "/embed", content=chunks)
        assert r.status_code == 413 and "over the server's limit of 1000" in r.json()["error"]
        assert httpx.post(url + "/embed", json={"inputs": "small"}).status_code == 200


def test_unknown_path_and_method(_tiny_server):
    assert httpx.get(_tiny_server + "/nope").status_code == 404
    assert httpx.get(_tiny_server + "/embed").status_code == 405


def test_model_error_fails_only_the_marked_request(tiny, patched):
    good = [_ids(7592, 2088), _ids(2023, 1037, 3231), _ids(4937)]
    want = tiny.encoder.embed_token_ids(good)
    with running(tiny) as (url, state), ThreadPoolExecutor(8) as pool:
        gate = pool.submit(httpx.post, url + "/embed", json={"inputs": _ids(GATE), "normalize": False}, timeout=60)
        assert patched.entered.wait(30)
        # queued behind the gate, so they share the next window with the poisoned request
        poison = pool.submit(httpx.post, url + "/embed", json={"inputs": _ids(5, POISON, 6)}, timeout=60)
        goods = [pool.submit(httpx.post, url + "/embed", json={"inputs": x, "normalize": False}) for x in good]
        _wait_until(lambda: state.batcher.queued_jobs == 4)
        patched.release()
        assert gate.result().status_code == 200
        r = poison.result()
        assert r.status_code == 500 and r.json()["error_type"] == "backend"
        assert "injected failure for a marked input" in r.json()["error"]
        for fut, row in zip(goods, want):
            assert fut.result().status_code == 200
            torch.testing.assert_close(torch.tensor(fut.result().json()[0]), row, rtol=0, atol=1e-5)
        # the shared window failed, then each request ran alone: only the poisoned one failed
        assert any(POISON in b and len(b) > 3 for b in patched.batches)
        after = httpx.post(url + "/embed", json={"inputs": good[0], "normalize": False})
        assert after.status_code == 200
        torch.testing.assert_close(torch.tensor(after.json()[0]), want[0], rtol=0, atol=1e-5)
        text = httpx.get(url + "/metrics").text
        assert metric(text, "trimformer_model_errors_total") >= 2  # the window, then the poisoned request alone
        assert metric(text, "trimformer_requests_total", endpoint="/embed", status="500") == 1


def _wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_queue_full_429_with_retry_after(tiny, patched):
    import openai

    with running(tiny, max_concurrent_requests=2) as (url, state), ThreadPoolExecutor(4) as pool:
        first = pool.submit(httpx.post, url + "/embed", json={"inputs": _ids(GATE)}, timeout=60)
        assert patched.entered.wait(30)
        second = pool.submit(httpx.post, url + "/embed", json={"inputs": _ids(1037)}, timeout=60)
        _wait_until(lambda: state.in_flight == 2)
        r = httpx.post(url + "/embed", json={"inputs": "one more"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error_type"] == "overloaded" and "limit 2" in r.json()["error"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.embeddings.create(model="m", input="one more")
        assert httpx.get(url + "/health").status_code == 200  # health is not a model request
        patched.release()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert httpx.post(url + "/embed", json={"inputs": "now"}).status_code == 200
        assert metric(httpx.get(url + "/metrics").text, "trimformer_rejected_requests_total", reason="overloaded") == 2


def test_client_disconnect_drops_its_queued_work(tiny, patched):
    with running(tiny) as (url, state), ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + "/embed", json={"inputs": _ids(GATE)}, timeout=60)
        assert patched.entered.wait(30)
        gone = [_ids(GONE, i) for i in range(1000, 1012)]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/embed", json={"inputs": gone}, timeout=httpx.Timeout(10, read=0.5))
        _wait_until(lambda: metric(httpx.get(url + "/metrics").text, "trimformer_cancelled_requests_total") == 1)
        patched.release()
        assert first.result().status_code == 200
        ok = httpx.post(url + "/embed", json={"inputs": ["still serving"], "normalize": False})
        assert ok.status_code == 200
        torch.testing.assert_close(torch.tensor(ok.json()), tiny.encoder.embed(["still serving"]), rtol=0, atol=1e-5)
        assert not any(GONE in b for b in patched.batches)  # never computed
        text = httpx.get(url + "/metrics").text
        assert metric(text, "trimformer_dropped_sequences_total") == len(gone)
        assert metric(text, "trimformer_requests_total", endpoint="/embed", status="499") == 1
        assert state.in_flight == 0 and state.batcher.queue_depth == 0


def test_api_key(tiny):
    import openai

    with running(tiny, api_key="sekret") as (url, _):
        r = httpx.post(url + "/embed", json={"inputs": "a"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error_type"] == "unauthorized"
        wrong = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        basic = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Authorization": "Basic sekret"})
        assert basic.status_code == 401
        for path in ("/info", "/metrics"):
            assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # open, for load balancers
        right = httpx.post(url + "/embed", json={"inputs": "a"}, headers={"Authorization": "Bearer sekret"})
        assert right.status_code == 200 and np.asarray(right.json()).shape == (1, 32)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).embeddings.create(model="m", input="a")
        resp = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0).embeddings.create(
            model="m", input="a"
        )
        assert len(resp.data[0].embedding) == 32
        assert json.loads(httpx.get(url + "/info", headers={"Authorization": "Bearer sekret"}).text)["auth"] is True


def test_drain_finishes_accepted_requests_then_stops(tiny, patched):
    with running(tiny, with_server=True) as (url, state, server, thread), ThreadPoolExecutor(2) as pool:
        accepted = pool.submit(httpx.post, url + "/embed", json={"inputs": _ids(GATE)}, timeout=60)
        assert patched.entered.wait(30)
        server.begin_drain()  # what SIGTERM does (the subprocess test sends the real signal)
        late = httpx.post(url + "/embed", json={"inputs": "late"})
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert httpx.get(url + "/health").status_code == 503
        time.sleep(0.3)
        assert thread.is_alive()  # still waiting for the accepted request
        patched.release()
        assert accepted.result().status_code == 200
        thread.join(30)
        assert not thread.is_alive() and not server.force_exit


def test_drain_gives_up_after_the_shutdown_timeout(tiny, patched):
    with running(tiny, with_server=True, shutdown_timeout=0.5) as (url, state, server, thread):
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(httpx.post, url + "/embed", json={"inputs": _ids(GATE)}, timeout=60)
            assert patched.entered.wait(30)
            t0 = time.monotonic()
            server.begin_drain()
            thread.join(30)
            assert not thread.is_alive() and server.force_exit
            assert 0.4 < time.monotonic() - t0 < 10
            patched.release()
            try:  # dropped: the connection closes, or the cancelled handler's 500 gets out first
                status = stuck.result().status_code
            except httpx.HTTPError:
                status = None
            assert status in (None, 500)
