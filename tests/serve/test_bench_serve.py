"""``trimformer bench serve`` end to end at toy size (tiny model, two points): rows, Markdown, plot, re-plot."""

import pytest

from trimformer.bench.common import read_rows
from trimformer.cli import main


@pytest.mark.slow
def test_bench_serve_smoke(tiny_dir, tmp_path):
    out = tmp_path / "results"
    args = ["bench", "serve", "--model", str(tiny_dir), "--device", "cpu", "--texts", "24", "--concurrency", "1,3"]
    args += ["--texts-per-request", "2", "--duration", "0.4", "--warmup", "0", "--no-offline", "--out", str(out)]
    args += ["--client-procs", "2"]  # clients spread over two processes (3 clients: 2 + 1)
    assert main(args) == 0
    rows = read_rows(out / "serve.csv")
    served = [r for r in rows if r["provider"] == "trimformer-serve" and r["metric"] == "texts_per_s"]
    assert sorted(r["params"]["concurrency"] for r in served) == [1, 3]
    assert all(r["p50"] > 0 and r["params"]["texts_per_request"] == 2 for r in served)
    assert all(r["params"]["min_cosine_vs_st"] >= 0.999 for r in served)
    assert all(r["params"]["client_procs"] == 2 and r["params"]["client_cpu_cores"] > 0 for r in served)
    assert all(r["params"]["server_cpu_cores"] > 0 for r in served)  # /proc is there on the Linux CI
    lat = [r for r in rows if r["metric"] == "latency_ms"]
    assert len(lat) == 2 and all(r["n"] >= 1 for r in lat)
    md = (out / "serve.md").read_text()
    assert "## Server under load" in md and "| 2 | 3 |" in md and "client CPU cores" in md
    png = out / "serve.png"
    assert png.stat().st_size > 0
    png.unlink()
    assert main(["bench", "serve", "--replot", "--out", str(out)]) == 0 and png.stat().st_size > 0
