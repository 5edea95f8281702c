"""``trimformer bench embed-cpu``: CPU embedding throughput, trimformer vs sentence-transformers vs HF padded batches.

Workload: ``--texts`` synthetic texts (default 2,000), ``--short-frac`` of them short queries of 5-30 tokens and the
rest passages of 60-254 tokens (256 with special tokens, the model's limit, so nothing is truncated), built from the
words of the bundled sample corpus with a fixed seed. Same model (default: the packaged all-MiniLM-L6-v2), fp32,
same process; the three providers run one after the other in a rotating order, ``--repeats`` times:

* ``trimformer``: ``Encoder.embed(texts)`` with the default token budget (length-sorted, packed, no padding);
* ``sentence-transformers``: ``SentenceTransformer.encode(texts, batch_size=32)`` (sorts by length, pads per batch);
* ``hf-padded``: ``AutoModel`` on batches of 32 texts in input order padded to the longest, mean pooling and L2
  normalisation (the plain loop most scripts write).

Then ``trimformer`` alone is swept over per-forward token budgets (``--sweep``) with the CPU cap lifted, which is how
the CPU forward size was chosen. Rows go to ``benchmarks/results/cpu/embed-cpu.csv``; ``embed-cpu.md`` and
``embed-cpu.png`` are rendered from this run.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

SUITE = "embed-cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local model folder (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--texts", type=int, default=2000, help="number of texts (default 2000)")
    parser.add_argument("--short-frac", type=float, default=0.7, help="fraction of short queries (default 0.7)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per provider (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", default=None, help="comma-separated torch intra-op thread counts to run (default: torch's)"
    )
    parser.add_argument("--hf-repeats", type=int, default=1, help="timed runs of the slow HF padded loop (default 1)")
    parser.add_argument(
        "--sweep",
        default="1024,2048,4096,8192,16384",
        help="comma-separated per-forward token budgets for the trimformer sweep ('' to skip)",
    )


def make_texts(tokenizer, n: int, *, short_frac: float = 0.7, seed: int = 0) -> list[str]:
    """``n`` texts: ``short_frac`` of 5-30 tokens, the rest 60-254 tokens (counts without special tokens).

    Words come from the bundled sample corpus; a word's token count is measured once, and a text's count is the sum
    (exact for WordPiece, close for other tokenizers).
    """
    corpus = Path(__file__).resolve().parents[1] / "data" / "sample_corpus.txt"
    words = sorted({w for line in corpus.read_text(encoding="utf-8").splitlines() for w in line.split()})
    counts = {w: len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words}
    words = [w for w in words if 0 < counts[w] <= 5]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(5, 30) if rng.random() < short_frac else rng.randint(60, 254)
        out, used = [], 0
        while used < target:
            w = rng.choice(words)
            if used + counts[w] <= target:
                out.append(w)
                used += counts[w]
        texts.append(" ".join(out))
    return texts


def _hf_padded(model, tokenizer, max_length: int, batch_size: int = 32):
    import torch
    import torch.nn.functional as F

    def run(texts: list[str]) -> torch.Tensor:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(
                    texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
                )
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                outs.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(outs)

    return run


def run(args) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from trimformer.bench.common import Recorder, line_plot
    from trimformer.engine.encoder import DEFAULT_BATCH_TOKENS, Encoder

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError(
            "the embed-cpu suite compares with sentence-transformers: pip install sentence-transformers"
        ) from None
    if args.texts <= 0 or args.repeats <= 0 or args.hf_repeats < 0:
        raise ValueError("--texts and --repeats must be positive, --hf-repeats non-negative")
    from trimformer.bench.common import int_list

    thread_counts = int_list(args.threads, "--threads") if args.threads else [torch.get_num_threads()]
    sweep = int_list(args.sweep, "--sweep") if args.sweep else []

    enc = Encoder.from_pretrained(args.model, device="cpu", dtype="float32")
    path = enc.name_or_path
    st = SentenceTransformer(path, device="cpu")
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(path)
    texts = make_texts(enc.tokenizer, args.texts, short_frac=args.short_frac, seed=args.seed)
    n_tokens, n_texts = enc.tokenize(texts).num_tokens, len(texts)

    providers = {
        "trimformer": lambda t: enc.embed(t),
        "sentence-transformers": lambda t: st.encode(t, batch_size=32, convert_to_tensor=True).float().cpu(),
        "hf-padded": _hf_padded(hf, hf_tok, enc.max_length),
    }
    settings = {
        "trimformer": {
            "batch_tokens": DEFAULT_BATCH_TOKENS,
            "forward_tokens": enc.forward_tokens(DEFAULT_BATCH_TOKENS),
        },
        "sentence-transformers": {"batch_size": 32, "sorted": True},
        "hf-padded": {"batch_size": 32, "sorted": False},
    }
    # correctness gate (and warm-up) on a subset: every provider against sentence-transformers
    subset = texts[:256]
    ref = providers["sentence-transformers"](subset)
    min_cos = {
        name: float(torch.nn.functional.cosine_similarity(fn(subset), ref).min()) for name, fn in providers.items()
    }
    if min_cos["trimformer"] < 0.9999:
        raise ValueError(f"trimformer embeddings disagree with sentence-transformers (min cosine {min_cos})")

    rec = Recorder.for_suite(SUITE, args.out)
    model_name = Path(path).name if args.model else "all-MiniLM-L6-v2"
    common = {"model": model_name, "texts": n_texts, "tokens": n_tokens, "short_frac": args.short_frac}
    common.update(dtype="float32", seed=args.seed)
    results = {}  # threads -> {provider: [seconds]}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        times = _alternate(providers, texts, args.repeats, args.hf_repeats)
        results[threads] = times
        for name, samples in times.items():
            params = {**common, **settings[name], "threads": threads, "min_cosine_vs_st": round(min_cos[name], 6)}
            params["load"] = _load()
            rec.add("mix", name, "texts_per_s", "texts/s", [n_texts / s for s in samples], **params)
            rec.add("mix", name, "tokens_per_s", "tokens/s", [n_tokens / s for s in samples], **params)

    sweep_rows = []
    if sweep:
        torch.set_num_threads(thread_counts[0])
        cap, enc.cpu_forward_tokens = enc.cpu_forward_tokens, None  # lift the CPU cap: the sweep shows why it exists
        for budget in sweep:
            t0 = time.perf_counter()
            enc.embed(texts, batch_tokens=budget)
            tps = n_tokens / (time.perf_counter() - t0)
            rec.add("budget-sweep", "trimformer", "tokens_per_s", "tokens/s", tps, budget=budget, **common)
            sweep_rows.append((budget, tps))
        enc.cpu_forward_tokens = cap

    rec.write_csv()
    md, summary = _render(rec, results, n_texts, n_tokens, sweep_rows, common, settings, min_cos)
    rec.write_text(f"{SUITE}.md", md)
    threads = thread_counts[0]
    med = {name: n_tokens / _median(s) for name, s in results[threads].items()}
    xs = [b for b, _ in sweep_rows] or [DEFAULT_BATCH_TOKENS]
    series = {"trimformer (per-forward budget, cap lifted)": (xs, [v for _, v in sweep_rows])} if sweep_rows else {}
    series.update(
        {
            "trimformer (default)": (xs, [med["trimformer"]] * len(xs)),
            "sentence-transformers (batch 32)": (xs, [med["sentence-transformers"]] * len(xs)),
            "HF padded (batch 32)": (xs, [med["hf-padded"]] * len(xs)),
        }
    )
    line_plot(
        rec.out_dir / f"{SUITE}.png",
        series,
        title=f"CPU embedding throughput, {model_name}, fp32, {threads} thread(s)",
        xlabel="tokens per forward (trimformer sweep)",
        ylabel="tokens/s (median)",
        logx=True,
    )
    print(summary)
    print(f"results: {rec.csv_path} (+ {SUITE}.md, {SUITE}.png)")
    return 0


def _median(samples: list[float]) -> float:
    from trimformer.bench.common import quantiles

    return quantiles(samples)[1]


def _alternate(providers: dict, texts: list[str], repeats: int, hf_repeats: int) -> dict[str, list[float]]:
    """Seconds per full run; providers alternate in a rotating order, HF padded only in its first rounds."""
    times: dict[str, list[float]] = {name: [] for name in providers}
    names = list(providers)
    for r in range(max(repeats, hf_repeats)):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            limit = hf_repeats if name == "hf-padded" else repeats
            if r >= limit:
                continue
            t0 = time.perf_counter()
            providers[name](texts)
            times[name].append(time.perf_counter() - t0)
    return {name: s for name, s in times.items() if s}


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def _render(rec, results, n_texts, n_tokens, sweep_rows, common, settings, min_cos) -> tuple[str, str]:
    """Markdown for this run and a one-line summary (first thread count)."""
    from trimformer.bench.common import markdown_table

    headers = (
        "threads",
        "provider",
        "runs",
        "texts/s",
        "tokens/s",
        "vs sentence-transformers",
        "vs HF padded",
        "best tokens/s",
        "best vs best ST",
        "min cos vs ST",
    )
    rows, summaries = [], []
    for threads, times in results.items():
        med = {name: _median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        for name, sec in med.items():
            rows.append(
                (
                    threads,
                    name,
                    len(times[name]),
                    n_texts / sec,
                    n_tokens / sec,
                    f"{med['sentence-transformers'] / sec:.2f}x",
                    f"{med['hf-padded'] / sec:.2f}x" if "hf-padded" in med else "-",
                    n_tokens / best[name],
                    f"{best['sentence-transformers'] / best[name]:.2f}x",
                    f"{min_cos[name]:.6f}",
                )
            )
        t = med["trimformer"]
        summaries.append(
            f"{threads} thread(s): trimformer {n_texts / t:.1f} texts/s, {n_tokens / t:,.0f} tokens/s = "
            f"{med['sentence-transformers'] / t:.2f}x sentence-transformers"
            + (f", {med['hf-padded'] / t:.2f}x HF padded" if "hf-padded" in med else "")
        )
    lines = [
        f"# {SUITE}: CPU embedding throughput",
        "",
        f"{n_texts} texts ({common['short_frac']:.0%} queries of 5-30 tokens, the rest passages of 60-256 tokens), "
        f"{n_tokens:,} tokens with special tokens; model {common['model']}, fp32; providers alternate in one process. "
        "texts/s and tokens/s are medians over the runs; the machine is shared with other jobs, so the best run "
        "(least disturbed) is shown too.",
        "",
        markdown_table(headers, rows),
        f"trimformer: `Encoder.embed(texts)` {settings['trimformer']}; sentence-transformers: "
        "`encode(texts, batch_size=32)` (length-sorted, padded per batch); HF padded: `AutoModel` on batches of 32 "
        "in input order, padded to the longest, mean pooling + L2 normalisation.",
        "",
    ]
    if sweep_rows:
        lines += [
            f"Per-forward token budget (trimformer, CPU cap lifted, one run each, {next(iter(results))} thread(s)):",
            "",
            markdown_table(("tokens per forward", "tokens/s"), sweep_rows),
        ]
    lines += [f"Environment: {rec.env_line()}; load average at the end {_load()}.", ""]
    return "\n".join(lines), "\n".join(summaries)
