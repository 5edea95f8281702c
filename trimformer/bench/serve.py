"""``trimformer bench serve``: the HTTP server under concurrent load vs sentence-transformers' offline ``encode``.

Workload: ``--texts`` synthetic texts (default 2,000; ``--short-frac`` 70% queries of 5-30 tokens, the rest passages
of 60-254 tokens, as in ``bench embed-cpu``), shuffled with a fixed seed. Steps, all on this machine:

1. Offline baselines in this process: ``SentenceTransformer.encode(texts, batch_size=B)`` for each ``--st-batch-sizes``
   and each ST dtype (the server's dtype and float32, ST's default), and trimformer's own offline
   ``Encoder.embed(texts)`` in the server's dtype; ``--st-repeats`` timed runs after a warm-up.
2. ``trimformer serve`` in a subprocess on a free loopback port (``--truncate``, limits raised so nothing is
   refused), checked against sentence-transformers fp32 (min cosine over the first 256 texts).
3. An asyncio load generator (:mod:`trimformer.serve.loadgen`: keep-alive HTTP/1.1 connections on asyncio streams,
   not httpx), its clients spread over ``--client-procs`` processes (default ``min(4, cores // 4)``) so that at high
   request rates it measures the server and not itself; the client processes' and the server's CPU use are
   recorded with each point. For each ``--texts-per-request`` and each ``--concurrency``, that many clients send
   back-to-back ``POST /v1/embeddings`` requests of consecutive corpus texts (``encoding_format`` base64 by default,
   what the official openai client asks for) for ``--duration`` seconds after ``--warmup`` seconds. Texts/s and tokens/s
   count answered texts over the wall time from the first send to the last answer; latency is per request (p50,
   p99). Every answer is checked for status 200 and one row per text.

Rows go to ``benchmarks/results/<device>/serve.csv``; ``serve.md`` and ``serve.png`` are rendered from this run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "serve"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local model folder (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="server dtype (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--texts", type=int, default=2000, help="corpus size (default 2000)")
    parser.add_argument("--short-frac", type=float, default=0.7, help="fraction of short queries (default 0.7)")
    parser.add_argument("--concurrency", default="1,8,64,256", help="client counts (default 1,8,64,256)")
    parser.add_argument("--texts-per-request", default="1,16", help="texts per request, comma list (default 1,16)")
    parser.add_argument("--duration", type=float, default=10.0, help="timed seconds per point (default 10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="untimed seconds before each point (default 3)")
    parser.add_argument("--encoding-format", default="base64", choices=("base64", "float"))
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="server token budget (default 16384)")
    parser.add_argument("--tokenization-workers", type=int, default=None, help="server tokenizer threads")
    parser.add_argument(
        "--server-workers", type=int, default=1, help="server processes (`trimformer serve --workers`, default 1)"
    )
    parser.add_argument("--st-batch-sizes", default="32", help="sentence-transformers batch sizes (default 32)")
    parser.add_argument("--st-repeats", type=int, default=2, help="timed offline runs per provider (default 2)")
    parser.add_argument("--no-offline", action="store_true", help="skip the offline baselines")
    parser.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server")
    parser.add_argument("--server-log", default=None, help="file for the server's output (default: a temp file)")
    parser.add_argument(
        "--client-procs", type=int, default=None, help="load-generator processes (default: min(4, cores // 4), >= 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true", help="only re-render serve.png from the last run's rows")


def default_client_procs() -> int:
    """Load-generator processes: a quarter of the cores, 1 to 4 (the rest is left to the server)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- offline
def _offline(args, path: str, texts: list[str], device: str, dtype: str, st_dtypes: list[str]) -> dict:
    """``{(provider, dtype, batch_size): [seconds per full run]}`` for sentence-transformers and trimformer (the
    ST model is cast explicitly: transformers loads a checkpoint in its stored dtype)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from trimformer.engine.encoder import Encoder

    def timed(fn) -> list[float]:
        fn(texts[:256])  # warm-up (kernels, allocator, CUDA graphs)
        out = []
        for _ in range(args.st_repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn(texts)
            _sync(device)
            out.append(time.perf_counter() - t0)
        return out

    from trimformer.bench.common import int_list

    results = {}
    for st_dtype in st_dtypes:
        st = SentenceTransformer(path, device=device)
        st.to({"float16": torch.float16, "bfloat16": torch.bfloat16}.get(st_dtype, torch.float32))
        for bs in int_list(args.st_batch_sizes, "--st-batch-sizes"):
            results[("sentence-transformers", st_dtype, bs)] = timed(
                lambda t, st=st, bs=bs: st.encode(t, batch_size=bs, convert_to_numpy=True)
            )
        del st
        _empty_cache(device)
    enc = Encoder.from_pretrained(path, device=device, dtype=dtype)
    results[("trimformer-offline", dtype, args.max_batch_tokens)] = timed(
        lambda t, enc=enc: enc.embed(t, batch_tokens=args.max_batch_tokens)
    )
    del enc
    _empty_cache(device)
    return results


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _empty_cache(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- server
def _start_server(args, path: str, device: str, dtype: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    from trimformer.bench.common import repo_root

    port = _free_port()
    cmd = [sys.executable, "-m", "trimformer", "serve", "--model", path, "--device", device, "--dtype", dtype]
    cmd += ["--port", str(port), "--max-batch-tokens", str(args.max_batch_tokens), "--truncate"]
    cmd += ["--max-concurrent-requests", "100000", "--max-client-batch-size", "100000", "--log-level", "warning"]
    cmd += ["--payload-limit", str(2**30)]
    if args.tokenization_workers:
        cmd += ["--tokenization-workers", str(args.tokenization_workers)]
    if args.server_workers > 1:
        cmd += ["--workers", str(args.server_workers)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=repo_root())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.server_timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ValueError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ValueError(f"the server did not become healthy in {args.server_timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:  # not healthy, or interrupted while waiting: leave no server behind
        if proc.poll() is None:
            proc.kill()
        raise


def _interrupted(signum: int, frame) -> None:
    raise ValueError(f"interrupted by {signal.Signals(signum).name}")


def _stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def _server_vectors(url: str, texts: list[str]):
    import base64

    import httpx
    import numpy as np

    body = httpx.post(url + "/v1/embeddings", json={"input": texts, "encoding_format": "base64"}, timeout=120).json()
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])


# ---------------------------------------------------------------------------------------------------- load
def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# ---------------------------------------------------------------------------------------------------- run
def run(args) -> int:
    import torch

    if args.replot:
        from trimformer.bench.common import Recorder

        print(f"re-rendered {replot(Recorder.for_suite(SUITE, args.out).out_dir)}")
        return 0

    from trimformer.bench.common import Recorder
    from trimformer.bench.embed_cpu import make_texts
    from trimformer.engine.encoder import default_model_path
    from trimformer.serve.loadgen import LoadGenerator, cpu_seconds, request_bytes

    try:
        import httpx  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"the serve suite needs httpx and sentence-transformers: {exc}") from None
    from trimformer.bench.common import int_list

    concurrency = int_list(args.concurrency, "--concurrency")
    per_request = int_list(args.texts_per_request, "--texts-per-request")
    if args.server_workers <= 0:
        raise ValueError(f"--server-workers must be positive, got {args.server_workers}")
    if args.client_procs is not None and args.client_procs <= 0:
        raise ValueError(f"--client-procs must be positive, got {args.client_procs}")
    if args.texts <= 0 or args.duration <= 0 or args.warmup < 0 or args.st_repeats <= 0:
        raise ValueError("--texts, --duration and --st-repeats must be positive, --warmup non-negative")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    dtype = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
    path = str(args.model or default_model_path())
    model_name = Path(path).name if args.model else "all-MiniLM-L6-v2"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = make_texts(tok, args.texts, short_frac=args.short_frac, seed=args.seed)
    random.Random(args.seed).shuffle(texts)
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    n_tokens = sum(lengths)

    rec = Recorder.for_suite(SUITE, args.out)
    common = {"model": model_name, "texts": len(texts), "tokens": n_tokens, "short_frac": args.short_frac}
    common.update(seed=args.seed, device_kind=device)
    st_dtypes = list(dict.fromkeys([dtype, "float32"]))
    offline = {} if args.no_offline else _offline(args, path, texts, device, dtype, st_dtypes)
    for (provider, dt, bs), secs in offline.items():
        params = {**common, "dtype": dt, ("batch_tokens" if provider.startswith("trim") else "batch_size"): bs}
        rec.add("offline", provider, "texts_per_s", "texts/s", [len(texts) / s for s in secs], **params)
        rec.add("offline", provider, "tokens_per_s", "tokens/s", [n_tokens / s for s in secs], **params)

    log_path = Path(args.server_log or Path(tempfile.mkdtemp(prefix="trimformer-bench-serve-")) / "server.log")
    # a SIGTERM (e.g. from `timeout`) ends the run like a failure: rows so far written, the server stopped
    previous = signal.signal(signal.SIGTERM, _interrupted)
    proc, url = _start_server(args, path, device, dtype, log_path)
    procs = args.client_procs or default_client_procs()
    clients = LoadGenerator(procs)
    points, failure = [], None
    try:
        min_cos = _check_server(url, texts[:256], path, device)
        for tpr in per_request:
            starts = range(0, len(texts) - tpr + 1, tpr)
            reqs = [request_bytes("127.0.0.1", texts[i : i + tpr], args.encoding_format) for i in starts]
            clients.set_requests(reqs, [tpr] * len(reqs), [sum(lengths[i : i + tpr]) for i in starts])
            for c in concurrency:
                if args.warmup > 0:
                    clients.run(url, c, args.warmup)
                cpu0 = cpu_seconds(proc.pid)
                r = clients.run(url, c, args.duration)
                cpu1 = cpu_seconds(proc.pid)
                if r["errors"]:
                    raise ValueError(f"{r['errors']} request(s) failed at concurrency {c}; server log: {log_path}")
                lat, wall = r["latencies"], r["wall"]
                server_cores = None if cpu0 is None or cpu1 is None else round((cpu1 - cpu0) / wall, 3)
                client_cores = round(r["client_cpu"] / wall, 3)
                params = {**common, "dtype": dtype, "concurrency": c, "texts_per_request": tpr}
                params.update(requests=len(lat), encoding=args.encoding_format, min_cosine_vs_st=round(min_cos, 6))
                params.update(client_procs=procs, client_cpu_cores=client_cores, server_cpu_cores=server_cores)
                params.update(server_workers=args.server_workers)
                case = f"c{c}-t{tpr}"
                rec.add(case, "trimformer-serve", "texts_per_s", "texts/s", r["texts"] / wall, **params)
                rec.add(case, "trimformer-serve", "tokens_per_s", "tokens/s", r["tokens"] / wall, **params)
                rec.add(case, "trimformer-serve", "latency_ms", "ms", [x * 1e3 for x in lat], **params)
                p99 = _percentile(lat, 0.99) * 1e3
                rec.add(case, "trimformer-serve", "latency_p99_ms", "ms", p99, **params)
                tps = r["texts"] / wall
                p50 = _percentile(lat, 0.5) * 1e3
                points.append((tpr, c, tps, r["tokens"] / wall, p50, p99, len(lat), client_cores, server_cores))
                print(
                    f"texts/request {tpr}, concurrency {c}: {tps:,.0f} texts/s, p99 {p99:.1f} ms "
                    f"(client CPU {client_cores:.2f} cores over {procs} process(es), server CPU "
                    f"{'-' if server_cores is None else f'{server_cores:.2f}'} cores)"
                )
    except (ValueError, OSError, asyncio.IncompleteReadError) as exc:
        failure = exc  # keep the points measured so far: they are written below, then the error is raised
    finally:
        clients.close()
        rc = _stop_server(proc)
        signal.signal(signal.SIGTERM, previous)
    if rc != 0 and failure is None:
        failure = ValueError(f"the server exited with {rc} after SIGTERM (log: {log_path})")
    rec.write_csv()
    md, summary = _render(rec, points, offline, len(texts), n_tokens, common, dtype, args)
    if failure is not None:
        md += f"\n**Run incomplete**: {type(failure).__name__}: {failure}\n"
    rec.write_text(f"{SUITE}.md", md)
    rates = _offline_rates(offline, len(texts))
    _plot(rec.out_dir / f"{SUITE}.png", points, rates, model_name, dtype, rec.env_line())
    print(summary)
    print(f"results: {rec.csv_path} (+ {SUITE}.md, {SUITE}.png)")
    if failure is not None:
        raise ValueError(f"bench serve stopped early: {failure} (server log: {log_path})") from failure
    return 0


def _check_server(url: str, texts: list[str], path: str, device: str) -> float:
    """Min cosine between the server's rows and sentence-transformers fp32 on ``texts``."""
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device=device).to(torch.float32)
    ref = st.encode(texts, convert_to_tensor=True).float().cpu()
    del st
    got = torch.from_numpy(_server_vectors(url, texts))
    cos = float(F.cosine_similarity(got, ref).min())
    _empty_cache(device)
    if cos < 0.999:
        raise ValueError(f"server embeddings disagree with sentence-transformers (min cosine {cos:.6f})")
    return cos


def _st_rate(offline: dict, dtype: str, n_texts: int) -> float | None:
    """Texts/s of sentence-transformers at its default batch size 32 (else the first measured) in ``dtype``."""
    from trimformer.bench.common import quantiles

    rows = {bs: s for (p, dt, bs), s in offline.items() if p == "sentence-transformers" and dt == dtype}
    if not rows:
        return None
    secs = rows.get(32) or next(iter(rows.values()))
    return n_texts / quantiles(secs)[1]


def _render(rec, points, offline, n_texts, n_tokens, common, dtype, args) -> tuple[str, str]:
    from trimformer.bench.common import markdown_table, quantiles

    st_same, st32 = _st_rate(offline, dtype, n_texts), _st_rate(offline, "float32", n_texts)
    off_rows = []
    for (provider, dt, bs), secs in offline.items():
        sec = quantiles(secs)[1]
        budget = f"{bs} tokens" if provider.startswith("trim") else f"batch {bs}"
        ratio = f"{(n_texts / sec) / st_same:.2f}x" if st_same else "-"
        off_rows.append((provider, dt, budget, len(secs), n_texts / sec, n_tokens / sec, ratio))
    headers = ("texts/request", "clients", "requests", "texts/s", "tokens/s", "p50 ms", "p99 ms")
    headers += (f"vs ST {dtype} offline",) + (("vs ST float32 offline",) if dtype != "float32" else ())
    headers += ("client CPU cores", "server CPU cores")
    rows = []
    for tpr, c, tps, toks, p50, p99, nreq, client_cores, server_cores in points:
        ratios = [f"{tps / st_same:.2f}x" if st_same else "-"]
        if dtype != "float32":
            ratios.append(f"{tps / st32:.2f}x" if st32 else "-")
        cpu = (f"{client_cores:.2f}", "-" if server_cores is None else f"{server_cores:.2f}")
        rows.append((tpr, c, nreq, tps, toks, p50, p99, *ratios, *cpu))
    lines = [
        f"# {SUITE}: HTTP embedding server under load",
        "",
        f"{n_texts} texts ({common['short_frac']:.0%} queries of 5-30 tokens, the rest passages of 60-256 tokens), "
        f"{n_tokens:,} tokens with special tokens; model {common['model']}; server `trimformer serve --device "
        f"{common['device_kind']} --dtype {dtype} --max-batch-tokens {args.max_batch_tokens}"
        f"{f' --workers {args.server_workers}' if args.server_workers > 1 else ''}` in a subprocess on "
        f"loopback; clients: asyncio keep-alive connections spread over {args.client_procs or default_client_procs()} "
        f"process(es), back-to-back `POST /v1/embeddings` (encoding_format {args.encoding_format}), {args.warmup:g} s "
        f"warm-up then {args.duration:g} s timed per point. CPU cores = CPU seconds used over the point's wall time "
        "(the client processes' together; the server process with all its threads).",
        "",
        "## Offline (one process, no HTTP)",
        "",
        markdown_table(("provider", "dtype", "batching", "runs", "texts/s", "tokens/s", f"vs ST {dtype}"), off_rows)
        if off_rows
        else "(skipped)\n",
        "## Server under load",
        "",
        markdown_table(headers, rows),
        "ST = sentence-transformers `encode(texts, batch_size=32)` offline on the same texts, same machine (median of "
        f"{args.st_repeats} runs); a server point counts HTTP, JSON, tokenization and queueing, the offline rows none "
        "of them.",
        "",
        f"Environment: {rec.env_line()}.",
        "",
    ]
    summary = []
    for tpr, c, tps, _, p50, p99, *_ in points:
        vs = f" = {tps / st_same:.2f}x ST {dtype}" if st_same else ""
        summary.append(f"{tpr} text(s)/request, {c} clients: {tps:,.0f} texts/s{vs}, p50 {p50:.1f}, p99 {p99:.1f} ms")
    return "\n".join(lines), "\n".join(summary)


def _offline_rates(offline: dict, n_texts: int) -> dict[str, float]:
    """``{legend label: median texts/s}`` of the offline providers."""
    from trimformer.bench.common import quantiles

    out = {}
    for (provider, dt, bs), secs in offline.items():
        label = f"{provider} {dt}" + (f", batch {bs}" if provider == "sentence-transformers" else "")
        out[label] = n_texts / quantiles(secs)[1]
    return out


def _plot(path, points, rates: dict[str, float], model_name: str, dtype: str, env: str) -> None:
    """Server texts/s against clients (one line per texts-per-request), offline rates as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=120)
    for i, tpr in enumerate(sorted({p[0] for p in points})):
        xs = [p[1] for p in points if p[0] == tpr]
        ys = [p[2] for p in points if p[0] == tpr]
        ax.plot(xs, ys, marker="o", color=f"C{i}", label=f"trimformer serve, {tpr} text(s)/request")
    styles = ("--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1)))
    for j, (label, rate) in enumerate(rates.items()):
        style = styles[j % len(styles)]
        ax.axhline(rate, linestyle=style, linewidth=1.2, color=f"C{5 + j}", label=f"{label} (offline)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("texts/s")
    ax.set_title(f"Embedding server throughput, {model_name}, {dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.text(0.01, 0.005, env, fontsize=5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def replot(out_dir: Path) -> Path:
    """Re-render ``serve.png`` from the last run recorded in ``<out_dir>/serve.csv`` (no measurement)."""
    from trimformer.bench.common import read_rows

    rows = read_rows(out_dir / f"{SUITE}.csv")
    if not rows:
        raise ValueError(f"{out_dir / (SUITE + '.csv')} has no rows")
    run_id = rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    points, rates = [], {}
    for r in rows:
        p = r["params"]
        if r["case"] == "offline" and r["metric"] == "texts_per_s":
            bs = f", batch {p['batch_size']}" if r["provider"] == "sentence-transformers" else ""
            rates[f"{r['provider']} {p['dtype']}{bs}"] = r["p50"]
        elif r["provider"] == "trimformer-serve" and r["metric"] == "texts_per_s":
            points.append((p["texts_per_request"], p["concurrency"], r["p50"]))
    first = rows[0]
    env = (
        f"device {first['device']}; torch {first['torch']}, triton {first['triton']}, transformers "
        f"{first['transformers']}, CUDA {first['cuda'] or '-'}; git {first['git_sha']}; run {run_id}"
    )
    dtype = next(r["params"]["dtype"] for r in rows if r["provider"] == "trimformer-serve")
    path = out_dir / f"{SUITE}.png"
    _plot(path, sorted(points), rates, first["params"]["model"], dtype, env)
    return path
