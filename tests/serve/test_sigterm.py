"""``trimformer serve`` as a subprocess with the real all-MiniLM-L6-v2: SIGTERM while requests are in flight drains
them (all 200, correct), refuses new ones with 503, and exits 0. CLI option errors exit 2 with one line."""

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.serve.helpers import metric, spawned
from trimformer.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "trimformer" / "data" / "sample_corpus.txt"


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(minilm):
    lines = [t for t in CORPUS.read_text(encoding="utf-8").splitlines() if t.strip()]
    # 32 texts of ~100 tokens, so the accepted requests are still being computed when SIGTERM arrives
    texts = [" ".join(lines[(7 * i + k) % len(lines)] for k in range(7)) for i in range(32)]
    requests = [texts[i : i + 4] for i in range(0, 32, 4)]
    want = minilm.encoder.embed(texts)
    with spawned("--device", "cpu", "--dtype", "float32", "--max-batch-tokens", "1024") as (url, proc):
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(httpx.post, url + "/embed", json={"inputs": r}, timeout=120) for r in requests]
            deadline = time.monotonic() + 60
            while metric(httpx.get(url + "/metrics").text, "trimformer_in_flight_requests") < len(requests):
                assert time.monotonic() < deadline, "requests never got in flight"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            refused = httpx.post(url + "/embed", json={"inputs": "too late"}, timeout=30)
            health = httpx.get(url + "/health", timeout=30)
            answers = [f.result() for f in futures]
        assert refused.status_code == 503 and refused.json()["error_type"] == "unavailable"
        assert refused.headers["retry-after"] == "1"
        assert health.status_code == 503
        assert [a.status_code for a in answers] == [200] * len(requests)
        got = torch.tensor([row for a in answers for row in a.json()])
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)  # each request got its own texts' rows
        assert proc.wait(60) == 0
        log = proc.stdout.read().decode()
        assert "SIGTERM: draining" in log and "Finished server process" in log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-batch-tokens", "0"], "--max-batch-tokens: expected a positive integer, got '0'"),
        (["--port", "70000"], "--port: expected a port in [0, 65535]"),
        (["--max-client-batch-size", "x"], "expected a positive integer, got 'x'"),
    ],
)
def test_cli_option_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_model_folder(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trimformer serve: error: model folder") and "does not exist" in err


def test_workers_serve_one_socket_and_drain_on_sigterm(tiny_dir):
    """``--workers 2``: two processes answer on one port, each request gets its own rows, SIGTERM drains both."""
    from trimformer.engine.encoder import Encoder

    texts = [f"worker test {i} " + "word " * (i % 7) for i in range(24)]
    want = Encoder.from_pretrained(tiny_dir, device="cpu").embed(texts, normalize=False)
    args = ("--model", str(tiny_dir), "--device", "cpu", "--workers", "2", "--max-batch-tokens", "256")
    with spawned(*args) as (url, proc):
        assert httpx.get(url + "/info").json()["workers"] == 2
        with ThreadPoolExecutor(8) as pool:
            posts = [
                pool.submit(httpx.post, url + "/embed", json={"inputs": [t], "normalize": False}, timeout=60)
                for t in texts
            ]
            answers = [f.result() for f in posts]
        assert [a.status_code for a in answers] == [200] * len(texts)
        torch.testing.assert_close(torch.tensor([a.json()[0] for a in answers]), want, rtol=0, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        log = proc.stdout.read().decode()
        assert "2 worker processes" in log and log.count("Finished server process") == 2
