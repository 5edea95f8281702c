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
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.texts <= 0 or args.repeats <= 0:
        raise ValueError("--texts and --repeats must be positive")
    sweep = [int(x) for x in args.sweep.split(",") if x.strip()] if args.sweep else []

    enc = Encoder.from_pretrained(args.model, device="cpu", dtype="float32")
    path = enc.name_or_path
    st = SentenceTransformer(path, device="cpu")
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(path)
    texts = make_texts(enc.tokenizer, args.texts, short_frac=args.short_frac, seed=args.seed)
    tokens = enc.tokenize(texts)
    n_tokens, n_texts = tokens.num_tokens, len(texts)

    providers = {
        "trimformer": lambda t: enc.embed(t),
        "sentence-transformers": lambda t: st.encode(t, batch_size=32, convert_to_tensor=True).float().cpu(),
        "hf-padded": _hf_padded(hf, hf_tok, enc.max_length),
    }
    # correctness gate (and warm-up) on a subset: every provider against sentence-transformers
    subset = texts[:256]
    ref = providers["sentence-transformers"](subset)
    min_cos = {}
    for name, fn in providers.items():
        min_cos[name] = float(torch.nn.functional.cosine_similarity(fn(subset), ref).min())
    if min_cos["trimformer"] < 0.9999:
        raise ValueError(f"trimformer embeddings disagree with sentence-transformers (min cosine {min_cos})")

    rec = Recorder.for_suite(SUITE, args.out)
    common = {
        "model": Path(path).name if args.model else "all-MiniLM-L6-v2",
        "texts": n_texts,
        "tokens": n_tokens,
        "short_frac": args.short_frac,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "seed": args.seed,
    }
    times: dict[str, list[float]] = {name: [] for name in providers}
    names = list(providers)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            providers[name](texts)
            times[name].append(time.perf_counter() - t0)
    settings = {
        "trimformer": {
            "batch_tokens": DEFAULT_BATCH_TOKENS,
            "forward_tokens": enc.forward_tokens(DEFAULT_BATCH_TOKENS),
        },
        "sentence-transformers": {"batch_size": 32, "sorted": True},
        "hf-padded": {"batch_size": 32, "sorted": False},
    }
    for name, samples in times.items():
        params = {**common, **settings[name], "min_cosine_vs_st": round(min_cos[name], 6), "load": _load()}
        rec.add("mix", name, "texts_per_s", "texts/s", [n_texts / s for s in samples], **params)
        rec.add("mix", name, "tokens_per_s", "tokens/s", [n_tokens / s for s in samples], **params)

    sweep_rows = []
    if sweep:
        enc.cpu_forward_tokens = None  # lift the CPU cap: the sweep shows why it exists
        for budget in sweep:
            t0 = time.perf_counter()
            enc.embed(texts, batch_tokens=budget)
            dt = time.perf_counter() - t0
            rec.add("budget-sweep", "trimformer", "tokens_per_s", "tokens/s", n_tokens / dt, budget=budget, **common)
            sweep_rows.append((budget, n_tokens / dt))
        enc.cpu_forward_tokens = enc.forward_tokens(DEFAULT_BATCH_TOKENS)

    rec.write_csv()
    md, summary = _render(rec, times, n_texts, n_tokens, sweep_rows, common, settings, min_cos)
    rec.write_text(f"{SUITE}.md", md)
    if sweep_rows:
        med = {name: n_tokens / sorted(s)[len(s) // 2] for name, s in times.items()}
        xs = [b for b, _ in sweep_rows]
        line_plot(
            rec.out_dir / f"{SUITE}.png",
            {
                "trimformer (per-forward budget)": (xs, [v for _, v in sweep_rows]),
                "trimformer (default)": (xs, [med["trimformer"]] * len(xs)),
                "sentence-transformers (batch 32)": (xs, [med["sentence-transformers"]] * len(xs)),
                "HF padded (batch 32)": (xs, [med["hf-padded"]] * len(xs)),
            },
            title=f"CPU embedding throughput, {common['model']}, fp32, {common['threads']} threads",
            xlabel="tokens per forward (trimformer sweep)",
            ylabel="tokens/s",
            logx=True,
        )
    print(summary)
    print(f"results: {rec.csv_path} (+ {SUITE}.md, {SUITE}.png)")
    return 0


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def _render(rec, times, n_texts, n_tokens, sweep_rows, common, settings, min_cos) -> tuple[str, str]:
    from trimformer.bench.common import markdown_table, quantiles

    med = {name: quantiles(s)[1] for name, s in times.items()}
    best = {name: min(s) for name, s in times.items()}
    st_s, hf_s = med["sentence-transformers"], med["hf-padded"]
    rows = []
    for name, s in med.items():
        rows.append(
            (
                name,
                n_texts / s,
                n_tokens / s,
                f"{st_s / s:.2f}x",
                f"{hf_s / s:.2f}x",
                n_tokens / best[name],
                f"{best['sentence-transformers'] / best[name]:.2f}x",
                f"{min_cos[name]:.6f}",
            )
        )
    table = markdown_table(
        (
            "provider",
            "texts/s",
            "tokens/s",
            "vs sentence-transformers",
            "vs HF padded",
            "best tokens/s",
            "best vs best ST",
            "min cos vs ST",
        ),
        rows,
    )
    lines = [
        f"# {SUITE}: CPU embedding throughput",
        "",
        f"{n_texts} texts ({common['short_frac']:.0%} queries of 5-30 tokens, the rest passages of 60-256 tokens), "
        f"{n_tokens} tokens with special tokens; model {common['model']}, fp32, {common['threads']} threads; "
        f"median (and best) of {len(next(iter(times.values())))} alternating runs per provider; the machine is shared, "
        "so the best run is the least disturbed one.",
        "",
        table,
        f"trimformer: {settings['trimformer']}; sentence-transformers: encode(batch_size=32) (length-sorted, padded); "
        "HF padded: AutoModel on batches of 32 in input order, mean pooling + L2 normalisation.",
        "",
    ]
    if sweep_rows:
        lines += [
            "Per-forward token budget sweep (trimformer, CPU cap lifted, one run each):",
            "",
            markdown_table(("tokens per forward", "tokens/s"), sweep_rows),
        ]
    lines += [f"Environment: {rec.env_line()}; load average at the end {_load()}.", ""]
    summary = (
        f"trimformer {n_texts / med['trimformer']:.1f} texts/s, {n_tokens / med['trimformer']:.0f} tokens/s: "
        f"{st_s / med['trimformer']:.2f}x sentence-transformers, {hf_s / med['trimformer']:.2f}x HF padded"
    )
    return "\n".join(lines), summary
