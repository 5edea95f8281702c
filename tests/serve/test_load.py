"""Load over real HTTP: 600 requests from 60 concurrent clients against a uvicorn server on loopback. No request
is lost and none is mixed up: every response equals ``Encoder.embed`` of its own texts."""

import asyncio
import random

import httpx
import pytest
import torch

from tests.serve.helpers import metric, running
from trimformer.serve import ServedModel

CLIENTS, REQUESTS_PER_CLIENT = 60, 10


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return ServedModel.load(tiny_dir, device="cpu", dtype="float32")


def _corpus(n: int, seed: int = 0) -> list[str]:
    """Distinct texts of 1-60 words (each text's number is in it, so no two share an embedding)."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon river mountain quick brown fox lazy dog server batch token".split()
    return [f"text {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for i in range(n)]


def test_many_concurrent_clients_each_get_their_own_rows(tiny):
    texts = _corpus(400)
    reference = tiny.encoder.embed(texts, normalize=False)
    rng = random.Random(1)
    # each request: 1-4 texts picked at random, so requests share windows in every combination
    plans = [
        [[rng.randrange(len(texts)) for _ in range(rng.randint(1, 4))] for _ in range(REQUESTS_PER_CLIENT)]
        for _ in range(CLIENTS)
    ]
    with running(tiny, max_batch_tokens=512) as (url, state):

        async def client(requests: list[list[int]], http: httpx.AsyncClient) -> list[tuple[list[int], object]]:
            out = []
            for k, picks in enumerate(requests):
                if k % 2:
                    r = await http.post("/embed", json={"inputs": [texts[i] for i in picks], "normalize": False})
                    rows = r.json() if r.status_code == 200 else None
                else:
                    r = await http.post("/v1/embeddings", json={"input": [texts[i] for i in picks]})
                    rows = [d["embedding"] for d in r.json()["data"]] if r.status_code == 200 else None
                out.append((picks, r.status_code, rows))
            return out

        async def main():
            limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
                return await asyncio.gather(*(client(p, http) for p in plans))

        results = asyncio.run(main())
        text = httpx.get(url + "/metrics").text
        assert state.in_flight == 0 and state.batcher.queue_depth == 0

    answered = [r for per_client in results for r in per_client]
    assert len(answered) == CLIENTS * REQUESTS_PER_CLIENT >= 500
    assert all(status == 200 for _, status, _ in answered), {s for _, s, _ in answered}
    for picks, _, rows in answered:
        got = torch.tensor(rows)
        assert got.shape == (len(picks), 32)
        torch.testing.assert_close(got, reference[picks], rtol=0, atol=1e-5)
    served = metric(text, "trimformer_requests_total", endpoint="/embed", status="200") + metric(
        text, "trimformer_requests_total", endpoint="/v1/embeddings", status="200"
    )
    assert served == len(answered)
    # dynamic batching really packed several requests per model call
    assert metric(text, "trimformer_batch_size_count") < len(answered)
    assert metric(text, "trimformer_batch_tokens_bucket", le="512") == metric(text, "trimformer_batch_tokens_count")
