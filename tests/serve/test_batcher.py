"""The token-budget batcher alone (no HTTP, no model): windows, scatter, cancellation, failure isolation, metrics."""

import asyncio
import threading

import numpy as np
import pytest
import torch

from trimformer.serve.batcher import Batcher, Job, ModelError
from trimformer.serve.metrics import Metrics


class FakeModel:
    """Row ``i`` of a window is ``[first id, length, sum of ids]``: it names its sequence. Blocks while ``gate`` is
    closed; raises when a window contains ``poison``."""

    def __init__(self, poison: int | None = None):
        self.windows: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison = poison

    def __call__(self, kind, ids, types):
        self.entered.set()
        self.gate.wait(30)
        self.windows.append([list(x) for x in ids])
        if self.poison is not None and any(self.poison in x for x in ids):
            raise RuntimeError("poisoned window")
        return torch.tensor([[x[0], len(x), sum(x)] for x in ids], dtype=torch.float32)


def _expected(ids):
    return np.array([[x[0], len(x), sum(x)] for x in ids], dtype=np.float32)


def _seqs(start: int, lengths: list[int]) -> list[list[int]]:
    return [[start + i] * n for i, n in enumerate(lengths)]


async def _submit_all(batcher: Batcher, jobs_ids: list[list[list[int]]], kind: str = "embed"):
    loop = asyncio.get_running_loop()
    jobs = [Job(kind, ids, None, loop.create_future(), loop) for ids in jobs_ids]
    futures = [batcher.submit(job) for job in jobs]
    return jobs, futures


async def _behind_gate(batcher: Batcher, model: FakeModel, jobs_ids):
    """Submit a one-token gate job, wait until the (blocked) model holds it, then queue ``jobs_ids`` behind it."""
    model.gate.clear()
    _, (gate,) = await _submit_all(batcher, [[[999]]])
    assert await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, 10)
    jobs, futures = await _submit_all(batcher, jobs_ids)
    return gate, jobs, futures


def test_windows_follow_the_budget_and_rows_go_home():
    model = FakeModel()
    batcher = Batcher(model, max_batch_tokens=10)
    requests = [_seqs(100, [4, 4]), _seqs(200, [3]), _seqs(300, [6, 2, 9, 1]), _seqs(400, [12]), _seqs(500, [1])]

    async def main():
        batcher.start()
        gate, _, futures = await _behind_gate(batcher, model, requests)
        model.gate.set()
        await gate
        return await asyncio.gather(*futures)

    results = asyncio.run(main())
    batcher.stop(5)
    for ids, got in zip(requests, results):
        np.testing.assert_array_equal(got, _expected(ids))
    # FIFO windows of at most 10 tokens; request 3 spans three windows; a 12-token sequence gets one of its own
    lengths = [[len(x) for x in w] for w in model.windows]
    assert lengths == [[1], [4, 4], [3, 6], [2], [9, 1], [12], [1]]
    owners = [[x[0] // 100 for x in w] for w in model.windows]
    assert owners == [[9], [1, 1], [2, 3], [3], [3, 3], [4], [5]]


def test_cancelled_job_is_never_computed():
    model = FakeModel()
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=100, metrics=metrics)

    async def main():
        batcher.start()
        gate, jobs, futures = await _behind_gate(batcher, model, [_seqs(100, [2]), _seqs(200, [3, 3]), _seqs(300, [1])])
        jobs[1].cancel()  # its client left while it waited in the queue
        futures[1].cancel()
        model.gate.set()
        await gate
        return await asyncio.gather(futures[0], futures[2])

    first, third = asyncio.run(main())
    batcher.stop(5)
    np.testing.assert_array_equal(first, _expected(_seqs(100, [2])))
    np.testing.assert_array_equal(third, _expected(_seqs(300, [1])))
    assert not any(x[0] in (200, 201) for w in model.windows for x in w)
    assert "trimformer_dropped_sequences_total 2" in metrics.render()


def test_a_failing_window_fails_only_the_request_that_fails_alone():
    model = FakeModel(poison=666)
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=100, metrics=metrics)
    requests = [_seqs(100, [2, 3]), [[7, 666, 7]], _seqs(300, [4])]

    async def main():
        batcher.start()
        gate, jobs, futures = await _behind_gate(batcher, model, requests)
        model.gate.set()
        await gate
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    batcher.stop(5)
    np.testing.assert_array_equal(results[0], _expected(requests[0]))
    assert isinstance(results[1], ModelError) and "poisoned window" in str(results[1])
    np.testing.assert_array_equal(results[2], _expected(requests[2]))
    assert [len(w) for w in model.windows] == [1, 4, 2, 1, 1]  # gate, shared window, then each alone
    assert "trimformer_model_errors_total 2" in metrics.render()


def test_kinds_are_not_mixed_and_stop_drains_the_queue():
    model = FakeModel()
    batcher = Batcher(model, max_batch_tokens=100)

    async def main():
        batcher.start()
        gate, _, _ = await _behind_gate(batcher, model, [])
        loop = asyncio.get_running_loop()
        jobs = [
            Job(kind, _seqs(100 * (i + 1), [2]), None, loop.create_future(), loop)
            for i, kind in enumerate(["embed", "embed", "classify", "embed"])
        ]
        futures = [batcher.submit(j) for j in jobs]
        model.gate.set()
        stopped = await loop.run_in_executor(None, batcher.stop, 5)  # finishes the queued jobs first
        await gate
        return stopped, await asyncio.gather(*futures)

    stopped, results = asyncio.run(main())
    assert stopped and len(results) == 4
    kinds = [{x[0] // 100 for x in w} for w in model.windows]
    assert kinds == [{9}, {1, 2}, {3}, {4}]  # two embed jobs share a window; the classify job stays apart
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(_submit_all(batcher, [_seqs(1, [1])]))


def test_metrics_render_prometheus_text():
    m = Metrics(in_flight=lambda: 3)
    m.request("/embed", 200, 0.004)
    m.request("/embed", 200, 0.2)
    m.request("/embed", 422, 0.001)
    m.batch(5, 300, 0.01)
    text = m.render()
    assert "# TYPE trimformer_requests_total counter" in text
    assert 'trimformer_requests_total{endpoint="/embed",status="200"} 2' in text
    assert 'trimformer_request_duration_seconds_bucket{endpoint="/embed",le="0.005"} 2' in text
    assert 'trimformer_request_duration_seconds_bucket{endpoint="/embed",le="+Inf"} 3' in text
    assert 'trimformer_request_duration_seconds_count{endpoint="/embed"} 3' in text
    assert 'trimformer_batch_tokens_bucket{le="256"} 0' in text and 'trimformer_batch_tokens_bucket{le="512"} 1' in text
    assert "trimformer_in_flight_requests 3" in text
    for line in text.splitlines():  # every sample line is "name{labels} value" with a float value
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


class FakeTokenizer:
    """Text ``"w1 w2 ..."`` -> ids ``[len(text), <word lengths>]`` (names its text), cut to ``limit`` with the cut
    indices in ``.truncated``; records each call; raises for a text containing ``"boom"``; blocks while ``gate``
    is closed."""

    def __init__(self, limit: int = 6):
        self.limit = limit
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, texts):
        from trimformer.engine.tokenization import Tokenized

        self.entered.set()
        self.gate.wait(30)
        self.calls.append(list(texts))
        if any("boom" in t for t in texts):
            raise ValueError("cannot tokenize boom")
        ids = [[len(t), *(len(w) for w in t.split())] for t in texts]
        cut = tuple(i for i, x in enumerate(ids) if len(x) > self.limit)
        return Tokenized([x[: self.limit] for x in ids], None, cut)


def _ids_of(text: str, limit: int = 6) -> list[int]:
    return [len(text), *(len(w) for w in text.split())][:limit]


def _refuse_cut(tokens):
    if tokens.truncated:
        raise OverflowError(f"input {tokens.truncated[0]} too long")


def test_texts_of_waiting_requests_are_tokenized_in_one_call_and_a_refused_one_spares_its_batchmates():
    model, tok = FakeModel(), FakeTokenizer()
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=100, metrics=metrics, tokenize=tok)
    texts = [["a bb"], ["ccc", "dddd e"], ["f g h i j k l m"], ["nn"]]  # request 2 is over the 6-token limit

    async def main():
        batcher.start()
        loop = asyncio.get_running_loop()
        tok.gate.clear()  # hold the stage on a first request, so the next four wait in the inbox together
        first = Job("embed", None, None, loop.create_future(), loop, texts=["zz"])
        batcher.submit(first)
        assert await loop.run_in_executor(None, tok.entered.wait, 10)
        jobs = [Job("embed", None, None, loop.create_future(), loop, texts=t, check=_refuse_cut) for t in texts]
        futures = [batcher.submit(j) for j in jobs]
        assert batcher.queued_jobs == 4 and batcher.queue_depth == 5
        tok.gate.set()
        await first.future
        return jobs, await asyncio.gather(*futures, return_exceptions=True)

    jobs, results = asyncio.run(main())
    batcher.stop(5)
    assert tok.calls == [["zz"], [t for group in texts for t in group]]  # one call for the four waiting requests
    assert isinstance(results[2], OverflowError) and "input 0 too long" in str(results[2])
    for i in (0, 1, 3):
        want = [_ids_of(t) for t in texts[i]]
        np.testing.assert_array_equal(results[i], _expected(want))
        assert jobs[i].num_tokens == sum(len(x) for x in want)
    assert not any(x[0] == len(texts[2][0]) for w in model.windows for x in w)  # the refused one never ran
    assert "trimformer_tokenization_duration_seconds_count 2" in metrics.render()


def test_a_failing_tokenizer_call_fails_only_the_request_that_fails_alone():
    model, tok = FakeModel(), FakeTokenizer()
    batcher = Batcher(model, max_batch_tokens=100, tokenize=tok)

    async def main():
        batcher.start()
        loop = asyncio.get_running_loop()
        tok.gate.clear()
        batcher.submit(Job("embed", None, None, loop.create_future(), loop, texts=["x"]))
        assert await loop.run_in_executor(None, tok.entered.wait, 10)
        jobs = [Job("embed", None, None, loop.create_future(), loop, texts=t) for t in (["ok"], ["boom"], ["fine"])]
        futures = [batcher.submit(j) for j in jobs]
        tok.gate.set()
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    batcher.stop(5)
    assert isinstance(results[1], ValueError) and "cannot tokenize boom" in str(results[1])
    np.testing.assert_array_equal(results[0], _expected([_ids_of("ok")]))
    np.testing.assert_array_equal(results[2], _expected([_ids_of("fine")]))
    assert ["ok", "boom", "fine"] in tok.calls and ["boom"] in tok.calls  # batched, then each alone


def test_a_window_resolves_all_its_jobs_with_one_callback_and_normalises_on_request():
    model = FakeModel()
    batcher = Batcher(model, max_batch_tokens=100)
    requests = [_seqs(100 * (i + 1), [2, 3]) for i in range(5)]

    async def main():
        batcher.start()
        loop = asyncio.get_running_loop()
        gate, jobs, futures = await _behind_gate(batcher, model, requests)
        jobs[1].normalize = jobs[3].normalize = True
        calls = []
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kw):
            calls.append(callback)
            return original(callback, *args, **kw)

        loop.call_soon_threadsafe = counting
        model.gate.set()
        await gate
        results = await asyncio.gather(*futures)
        loop.call_soon_threadsafe = original
        return calls, results

    calls, results = asyncio.run(main())
    batcher.stop(5)
    assert len(calls) == 2  # the gate's window, then one for the five jobs of the next window
    for i, (ids, got) in enumerate(zip(requests, results)):
        want = _expected(ids)
        if i in (1, 3):
            want = want / np.linalg.norm(want, axis=-1, keepdims=True)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_job_cancelled_in_the_inbox_is_never_tokenized():
    model, tok = FakeModel(), FakeTokenizer()
    metrics = Metrics()
    batcher = Batcher(model, max_batch_tokens=100, metrics=metrics, tokenize=tok)

    async def main():
        batcher.start()
        loop = asyncio.get_running_loop()
        tok.gate.clear()
        batcher.submit(Job("embed", None, None, loop.create_future(), loop, texts=["x"]))
        assert await loop.run_in_executor(None, tok.entered.wait, 10)
        gone = Job("embed", None, None, loop.create_future(), loop, texts=["left early", "too"])
        kept = Job("embed", None, None, loop.create_future(), loop, texts=["stays"])
        batcher.submit(gone)
        batcher.submit(kept)
        gone.cancel()
        tok.gate.set()
        return await kept.future

    kept = asyncio.run(main())
    batcher.stop(5)
    np.testing.assert_array_equal(kept, _expected([_ids_of("stays")]))
    assert tok.calls == [["x"], ["stays"]]
    assert "trimformer_dropped_sequences_total 2" in metrics.render()


def test_submit_refuses_jobs_without_a_way_to_their_tokens():
    batcher = Batcher(FakeModel(), max_batch_tokens=10)

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(ValueError, match="input_ids, texts or prepare"):
            batcher.submit(Job("embed", None, None, loop.create_future(), loop))
        with pytest.raises(ValueError, match="no tokenizer"):
            batcher.submit(Job("embed", None, None, loop.create_future(), loop, texts=["a"]))

    asyncio.run(main())
    with pytest.raises(ValueError, match="tokenizer_threads"):
        Batcher(FakeModel(), max_batch_tokens=10, tokenizer_threads=0)
