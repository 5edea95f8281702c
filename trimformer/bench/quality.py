"""``trimformer bench quality``: small-scale LM quality of attention types (the paper's Tables III-V at small scale).

Protocol (``cca-spec.md`` sections 5, 6 and 9.14): byte-level Llama-style LMs on the Python standard library, one
base config (``trimformer/data/quality.yaml``: E = 512, 8 layers, 16 MHA heads of 32, context 512), the attention
swapped per method, every model parameter-matched to the MHA model through its SwiGLU width, the same training
tokens and data order for every method, several seeds. Methods (KV compression as in the paper, ``d_h`` = E/16):

* ``mha`` (16/16 heads), ``gqa-4`` (16 query / 4 kv heads), ``mla`` (KV latent ``E/2 - d_r`` + RoPE key ``d_r = d_h/2``:
  a 4x smaller cache, query latent E/2), ``cca-4x`` (4/4 latent heads, 2 convs, q-k mean, value shift),
  ``ccgqa-2x8x`` (8 query / 2 kv latent heads);
* the CCA-4x ablation ladder: ``cca-4x-0conv`` (no conv, no q-k mean, no value shift), ``cca-4x-1conv``,
  ``cca-4x-2conv``, ``cca-4x-2conv-vshift``, and ``cca-4x`` on top (+ q-k mean).

MHA/GQA rotate the whole head (Llama), CCA/CCGQA half of it with linear temperature and kernels 2/2 (ZAYA1).

Every finished run appends rows to ``benchmarks/results/<device>/quality.csv`` (final validation loss with its curve,
train loss, tokens/s); the Markdown table (mean and spread over seeds, KV bytes/token, parameters, tokens/s, the
paper's numbers beside) and ``quality.png`` are rendered from *all* rows of the CSV with the same sweep signature,
so a sweep can be split across calls (``--methods``, ``--seeds``) and merged. ``--dry-run`` measures a few steps per
method instead and prints the time a full run would take.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from pathlib import Path

SUITE = "quality"
METHOD_ORDER = ("mha", "gqa-4", "mla", "cca-4x", "ccgqa-2x8x",
                "cca-4x-0conv", "cca-4x-1conv", "cca-4x-2conv", "cca-4x-2conv-vshift")  # fmt: skip
MAIN = METHOD_ORDER[:5]
LADDER = ("cca-4x-0conv", "cca-4x-1conv", "cca-4x-2conv", "cca-4x-2conv-vshift", "cca-4x")
#: Paper validation losses: dense 1B / 300B tokens (Tables III, IV) and MoE 350M-active (Fig. 4, Table V).
PAPER = {
    "mha": (2.297, 2.282), "gqa-4": (2.297, 2.278), "mla": (2.321, 2.271), "cca-4x": (2.307, 2.241),
    "ccgqa-2x8x": (2.286, 2.246), "cca-4x-0conv": (2.330, 2.280), "cca-4x-1conv": (2.327, 2.264),
    "cca-4x-2conv": (2.319, 2.252), "cca-4x-2conv-vshift": (2.317, 2.248),
}  # fmt: skip
PAPER_LADDER_TOP = (2.315, 2.241)  # Table IV's full CCA differs from Table III's 2.307; the paper does not say why


PROTOCOL = (
    "Byte-level Llama-style LMs (RMSNorm, SwiGLU) trained on the Python standard library's sources (split by file "
    "into train and validation), one base config with only the attention swapped: MHA 16 heads; GQA-4 16 query / 4 "
    "kv heads; MLA with a 4x smaller cache (KV latent E/2 - d_r plus a shared RoPE key of d_r = d_h/2, query latent "
    "E/2); CCA-4x 4/4 latent heads (2 convs, q-k mean, value shift); CCGQA-2x/8x 8 query / 2 kv latent heads; and "
    "the CCA-4x ablation ladder (0 convs; 1 conv; 2 convs; + value shift; + q-k mean = CCA-4x). All heads keep "
    "d_h = E/16; MHA/GQA rotate whole heads, CCA/CCGQA half of each head (ZAYA1: kernels 2/2, linear temperature). "
    "Every model is parameter-matched to the MHA model through its SwiGLU width and sees the same training tokens "
    "in the same order for a given seed (the seed sets the initialisation and the document order). Validation loss "
    "is the mean next-byte loss (nats) on the first tokens of the validation split at the end of training; the "
    "spread is over seeds; comparisons use per-seed (paired) differences and call a difference noise when it is "
    "within two standard errors (with two seeds that error has one degree of freedom: read differences of a few "
    "millinats as ties)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="quality", help="base run config (file or bundled name; default quality)")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER),
                        help=f"comma-separated methods (default all): {', '.join(METHOD_ORDER)}")  # fmt: skip
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--tokens", type=float, default=None, help="training tokens per run (default: the config's)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run instead of --tokens")
    parser.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds for this call: runs that would not finish are skipped (default: no limit)",
    )  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the base config (e.g. --set train.micro_batch_size=32)")  # fmt: skip
    parser.add_argument("--runs-dir", default="runs/quality", help="run folders (logs) (default runs/quality)")
    parser.add_argument("--dry-run", action="store_true", help="time a few steps per method, estimate full runs")
    parser.add_argument("--dry-steps", type=int, default=4, help="steps per method in --dry-run (default 4)")
    parser.add_argument(
        "--assumed-tflops", type=float, default=150.0,
        help="achieved bf16 TFLOP/s assumed for the FLOP-scaled GPU estimate (default 150)",
    )  # fmt: skip
    parser.add_argument("--render-only", action="store_true", help="only re-render the Markdown and plot")


def method_attention(method: str, hidden_size: int, heads: int = 16) -> dict:
    """The attention config (dict) of one method at width ``hidden_size`` with ``heads`` MHA heads."""
    d = hidden_size // heads
    full = {"rope_fraction": 1.0}
    cca = {"kind": "cca", "num_heads": heads // 4, "num_kv_heads": heads // 4, "head_dim": d}
    table = {
        "mha": {"kind": "mha", "num_heads": heads, "num_kv_heads": heads, "head_dim": d, **full},
        "gqa-4": {"kind": "gqa", "num_heads": heads, "num_kv_heads": heads // 4, "head_dim": d, **full},
        "mla": {"kind": "mla", "num_heads": heads, "num_kv_heads": heads, "head_dim": d, "rope_head_dim": d // 2,
                "kv_lora_rank": hidden_size // 2 - d // 2, "q_lora_rank": hidden_size // 2},
        "cca-4x": cca,
        "ccgqa-2x8x": {"kind": "ccgqa", "num_heads": heads // 2, "num_kv_heads": heads // 8, "head_dim": d},
        "cca-4x-0conv": {**cca, "num_convs": 0, "qk_mean": False, "value_shift": False},
        "cca-4x-1conv": {**cca, "num_convs": 1, "qk_mean": False, "value_shift": False},
        "cca-4x-2conv": {**cca, "qk_mean": False, "value_shift": False},
        "cca-4x-2conv-vshift": {**cca, "qk_mean": False},
    }  # fmt: skip
    if method not in table:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHOD_ORDER)}")
    return table[method]


def _parse_list(text: str, cast, what: str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"--{what} is empty")
    return [cast(x) for x in items]


def _base(args):
    from trimformer.commands.train import resolve_config_path
    from trimformer.train import load_config

    run = load_config(resolve_config_path(args.config), list(args.overrides))
    if args.max_steps is not None:
        run.train.max_steps, run.train.max_tokens = args.max_steps, None
    elif args.tokens is not None:
        run.train.max_tokens = int(args.tokens)
    return run


def sweep_signature(run) -> tuple[str, dict]:
    """Short hash and summary of everything but the attention method and seed (rows with equal signatures merge)."""
    model = {k: v for k, v in run.model.items() if k not in ("attention", "match_params", "intermediate_size")}
    t = run.train
    summary = {"model": model, "data": {k: getattr(run.data, k) for k in ("corpus", "tokenizer", "seq_len",
               "val_fraction")}, "train": {k: getattr(t, k) for k in ("micro_batch_size", "grad_accum", "max_steps",
               "max_tokens", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "betas", "grad_clip",
               "precision", "eval_tokens")}}  # fmt: skip
    digest = hashlib.sha1(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:10]
    return digest, summary


def _method_run(base, method: str, seed: int, target_params: int, runs_dir: Path, signature: str):
    from trimformer.train import RunConfig

    d = base.to_dict()
    d["model"]["attention"] = method_attention(method, d["model"]["hidden_size"])
    d["model"]["match_params"] = target_params
    d["train"].update(seed=seed, out_dir=str(runs_dir / signature / f"{method}-s{seed}"), resume="none")
    return RunConfig.from_dict(d)


def _target_params(base, tokenizer) -> int:
    from trimformer.models.lm import model_params
    from trimformer.train import build_model_config

    model = dict(base.model, attention=method_attention("mha", base.model["hidden_size"]))
    model.pop("match_params", None)
    return model_params(build_model_config(model, tokenizer))


def run(args) -> int:
    import torch

    from trimformer.bench.common import Recorder
    from trimformer.models.lm.sizing import kv_bytes_per_token, train_flops_per_token
    from trimformer.train import Trainer, tokenize_corpus
    from trimformer.train.metrics import read_log
    from trimformer.train.tokenizer import load_tokenizer

    rec = Recorder.for_suite(SUITE, args.out)
    if args.render_only:
        return _render(rec)
    methods = _parse_list(args.methods, str, "methods")
    for m in methods:
        method_attention(m, 512)
    seeds = _parse_list(args.seeds, int, "seeds")
    base = _base(args)
    tokenizer = load_tokenizer(base.data.tokenizer)
    started = time.perf_counter()
    splits = tokenize_corpus(base.data.corpus, tokenizer, val_fraction=base.data.val_fraction,
                             extensions=tuple(base.data.extensions) if base.data.extensions else None,
                             max_files=base.data.max_files)  # fmt: skip
    target = _target_params(base, tokenizer)
    signature, summary = sweep_signature(base)
    runs_dir = Path(args.runs_dir)
    if args.dry_run:
        return _dry_run(args, base, methods, target, runs_dir, splits)
    done_s: list[float] = []
    for seed in seeds:  # seed-major: a call cut short by its time budget still covers every method once
        for method in methods:
            elapsed = time.perf_counter() - started
            if args.time_budget is not None and done_s and elapsed + statistics.mean(done_s) > args.time_budget:
                print(f"[quality] time budget: skipping {method} seed {seed} ({elapsed:.0f}s used)")
                continue
            run_cfg = _method_run(base, method, seed, target, runs_dir, signature)
            if args.time_budget is not None:
                run_cfg.train.time_budget_s = max(1.0, args.time_budget - elapsed)
            t0 = time.perf_counter()
            trainer = Trainer(run_cfg, splits=splits)
            result = trainer.train()
            wall = time.perf_counter() - t0
            done_s.append(wall)
            cfg = trainer.config
            curve = [[r["tokens"], round(r["val_loss"], 5)] for r in read_log(result.out_dir / "log.jsonl")
                     if r.get("kind") == "eval"]  # fmt: skip
            att = cfg.attention_config
            common = {
                "signature": signature, "sweep": summary, "seed": seed, "params_total": result.params,
                "tokens": result.tokens, "steps": result.steps, "kv_bytes_per_token": kv_bytes_per_token(cfg),
                "heads": f"{att.num_heads}/{att.num_kv_heads}x{att.head_dim}", "intermediate_size":
                cfg.intermediate_size, "stopped_early": result.stopped_early, "wall_s": round(wall, 1),
                "flops_per_token": train_flops_per_token(cfg, base.data.seq_len), "bf16": trainer.bf16,
            }  # fmt: skip
            if result.val_loss is not None:
                rec.add(method, f"seed{seed}", "val_loss", "nats/token", result.val_loss, curve=curve, **common)
            rec.add(method, f"seed{seed}", "train_loss", "nats/token", result.train_loss, **common)
            rec.add(method, f"seed{seed}", "tokens_per_s", "tokens/s", result.tokens_per_s, **common)
            rec.write_csv()
            rec.rows.clear()
            val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
            print(f"[quality] {method} seed {seed}: val {val}, {result.params / 1e6:.2f}M params, "
                  f"{result.tokens:,} tokens, {result.tokens_per_s:,.0f} tokens/s, {wall:.0f}s")  # fmt: skip
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return _render(rec)


def _dry_run(args, base, methods, target, runs_dir, splits) -> int:
    """Time ``--dry-steps`` steps of every method here; print the full run's duration here and FLOP-scaled on a GPU."""
    from trimformer.bench.common import markdown_table
    from trimformer.models.lm.sizing import train_flops_per_token
    from trimformer.train import Trainer

    full_tokens = base.train.max_tokens or base.train.max_steps * base.train.micro_batch_size * base.data.seq_len
    rows = []
    for method in methods:
        cfg = _method_run(base, method, 0, target, runs_dir / "dry-run", "dry")
        cfg.train.max_tokens, cfg.train.max_steps = None, args.dry_steps
        cfg.train.eval_every, cfg.train.save_final, cfg.train.log_every = 0, False, args.dry_steps
        trainer = Trainer(cfg, splits=splits)
        result = trainer.train()
        flops = train_flops_per_token(trainer.config, base.data.seq_len)
        est_gpu = args.assumed_tflops * 1e12 / flops
        rows.append((method, f"{result.params / 1e6:.2f}M", f"{flops / 1e9:.3f}", f"{result.tokens_per_s:,.0f}",
                     f"{result.tokens_per_s * flops / 1e9:.1f}", f"{full_tokens / result.tokens_per_s / 60:.1f}",
                     f"{est_gpu:,.0f}", f"{full_tokens / est_gpu:.0f}"))  # fmt: skip
    print(f"dry run, {args.dry_steps} steps per method (the first is not timed); a full run is {full_tokens:,} tokens")
    headers = ("method", "params", "GFLOP/token (train)", "tokens/s here", "GFLOP/s here", "min per run here",
               f"est. tokens/s at {args.assumed_tflops:.0f} TFLOP/s", "est. s per run there")  # fmt: skip
    print(markdown_table(headers, rows))
    return 0


# ----- rendering: the Markdown table, the comparison with the paper and the plot, from every row of the CSV ---------
def _stats(values: list[float]) -> tuple[float, float | None, float, float]:
    """``(mean, sample std or None, min, max)``."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.mean(values), std, min(values), max(values)


def _collect(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """``{signature: {method: {"val": [...], "rate": [...], "row": a val_loss row, "curves": [...]}}}``."""
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        p = row["params"]
        if row.get("suite") != SUITE or p.get("stopped_early") or "signature" not in p:
            continue
        entry = out.setdefault(p["signature"], {}).setdefault(
            row["case"], {"val": {}, "rate": {}, "row": None, "curves": {}}
        )
        if row["metric"] == "val_loss":
            entry["val"][p["seed"]] = row["p50"]  # a re-run of a seed replaces the older row
            entry["curves"][p["seed"]] = p.get("curve", [])
            entry["row"] = row
        elif row["metric"] == "tokens_per_s":
            entry["rate"][p["seed"]] = row["p50"]
    return {sig: {m: e for m, e in methods.items() if e["val"]} for sig, methods in out.items()}


def _verdict(diff: float, noise: float | None, paper_says_lower: bool) -> str:
    agrees = (diff < 0) == paper_says_lower
    if noise is None:
        return ("agrees" if agrees else "disagrees") + " (one seed: spread unknown)"
    if abs(diff) <= 2 * noise:
        return ("agrees" if agrees else "disagrees") + f", within seed noise (2 s.e. = {2 * noise:.4f})"
    return "agrees" if agrees else "DISAGREES"


def _claims(methods: dict[str, dict]) -> list[str]:
    """One line per paper claim whose two methods were measured: ours vs the paper's dense and MoE results."""
    pairs = [
        ("ccgqa-2x8x", "gqa-4", "CCGQA-2x/8x beats GQA-4 with half its KV cache"),
        ("ccgqa-2x8x", "mha", "CCGQA-2x/8x beats MHA (8x smaller KV cache)"),
        ("cca-4x", "mla", "CCA-4x beats MLA at the same 4x KV compression"),
        ("cca-4x", "gqa-4", "CCA-4x beats GQA-4"),
        ("cca-4x", "mha", "CCA-4x beats MHA"),
        ("mla", "gqa-4", "MLA beats GQA-4"),
        *[(b, a, f"ladder: {b} beats {a}") for a, b in zip(LADDER[:-1], LADDER[1:])],
    ]
    lines = []
    for a, b, text in pairs:
        if a not in methods or b not in methods:
            continue
        sa, sb = methods[a]["val"], methods[b]["val"]
        va, vb = list(sa.values()), list(sb.values())
        diff = statistics.mean(va) - statistics.mean(vb)
        paired = sorted(set(sa) & set(sb))
        noise = None
        if len(paired) > 1:  # same seed = same data order: the per-seed differences carry less noise
            noise = statistics.stdev([sa[s] - sb[s] for s in paired]) / math.sqrt(len(paired))
        elif len(va) > 1 and len(vb) > 1:
            noise = math.sqrt(statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb))
        pa = PAPER_LADDER_TOP if (a == "cca-4x" and b in LADDER) else PAPER[a]
        pd, pm = pa[0] - PAPER[b][0], pa[1] - PAPER[b][1]
        lines.append(
            f"- {text}: ours {diff:+.4f} nats ({len(va)} vs {len(vb)} seeds); paper dense {pd:+.3f} -> "
            f"{_verdict(diff, noise, pd < 0)}; paper MoE {pm:+.3f} -> {_verdict(diff, noise, pm < 0)}."
        )
    return lines


def _kendall(a: list[str], b: list[str]) -> float:
    """Kendall's tau between two orderings of the same items."""
    pos = {m: i for i, m in enumerate(b)}
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += 1 if pos[a[i]] < pos[a[j]] else -1
    return s / (n * (n - 1) / 2) if n > 1 else 1.0


def _table(methods: dict[str, dict]) -> str:
    from trimformer.bench.common import markdown_table

    mha = methods.get("mha")
    mha_mean = statistics.mean(mha["val"].values()) if mha else None
    mha_kv = mha["row"]["params"]["kv_bytes_per_token"] if mha else None
    rows = []
    for m in [m for m in METHOD_ORDER if m in methods] + sorted(set(methods) - set(METHOD_ORDER)):
        e = methods[m]
        p = e["row"]["params"]
        mean, std, lo, hi = _stats(list(e["val"].values()))
        paper = tuple(f"{x:.3f}" for x in PAPER[m]) if m in PAPER else ("-", "-")
        if m == "cca-4x":
            paper = (f"{paper[0]} (ladder {PAPER_LADDER_TOP[0]:.3f})", paper[1])
        rate = statistics.mean(e["rate"].values()) if e["rate"] else float("nan")
        rows.append((
            m, p["heads"], f"{p['params_total'] / 1e6:.2f}M", p["kv_bytes_per_token"],
            f"{mha_kv / p['kv_bytes_per_token']:.1f}x" if mha_kv else "-", len(e["val"]), f"{mean:.4f}",
            f"{std:.4f}" if std is not None else "-", f"{lo:.4f}-{hi:.4f}",
            f"{mean - mha_mean:+.4f}" if mha_mean is not None else "-", paper[0], paper[1],
            f"{p['tokens']:,}", f"{rate:,.0f}",
        ))  # fmt: skip
    return markdown_table(
        ("method", "heads q/kv x d_h", "params", "KV bytes/token (bf16, all layers)", "KV smaller than MHA", "seeds",
         "val loss (mean)", "std", "min-max", "vs MHA", "paper dense 1B", "paper MoE", "train tokens", "tokens/s"),
        rows,
    )  # fmt: skip


def _plot(path: Path, methods: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for ax, group, name in ((axes[0], MAIN, "attention types"), (axes[1], LADDER, "CCA-4x ablation ladder")):
        finals = []
        for m in group:
            if m not in methods:
                continue
            curves = [dict(map(tuple, c)) for c in methods[m]["curves"].values() if c]
            if not curves:
                continue
            xs = sorted(set.intersection(*[set(c) for c in curves]))
            ys = [statistics.mean(c[x] for c in curves) for x in xs]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{m} ({len(curves)} seeds)")
            finals.extend(ys[len(ys) // 3 :])
        if finals:  # zoom on the later part of training, where the methods separate
            lo, hi = min(finals), max(finals)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
        ax.set_title(name)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss (nats/token, mean over seeds)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _render(rec) -> int:
    from trimformer.bench.common import read_rows

    if not rec.csv_path.exists():
        raise ValueError(f"no results yet in {rec.csv_path}: run the sweep first")
    rows = read_rows(rec.csv_path)
    sweeps = _collect(rows)
    if not sweeps:
        raise ValueError(f"{rec.csv_path} holds no finished quality runs")
    latest = {s: max(r["timestamp"] for r in rows if r["params"].get("signature") == s) for s in sweeps}
    order = sorted(sweeps, key=lambda s: latest[s], reverse=True)
    paper = ("Paper numbers: validation loss of the dense 1B model (300B tokens; Table III, ablations Table IV) and "
             "of the 350M-active MoE (50B tokens; Fig. 4, Table V). Absolute values are not comparable (our models "
             "are ~25M parameters trained on bytes of Python for minutes); the orderings are.")  # fmt: skip
    lines = [f"# {SUITE}: small-scale LM quality of attention types", "", PROTOCOL, "", paper, ""]
    for i, sig in enumerate(order):
        methods = sweeps[sig]
        summary = next(r["params"]["sweep"] for r in rows if r["params"].get("signature") == sig)
        devices = sorted({r["device"] for r in rows if r["params"].get("signature") == sig})
        shas = sorted({r["git_sha"] for r in rows if r["params"].get("signature") == sig})
        png = f"{SUITE}.png" if i == 0 else f"{SUITE}-{sig}.png"
        tr = summary["train"]
        budget = f"{tr['max_tokens']:,} tokens" if tr["max_tokens"] else f"{tr['max_steps']} steps"
        _plot(rec.out_dir / png, methods, f"sweep {sig}: {json.dumps(summary['model'])}, context "
              f"{summary['data']['seq_len']}, {budget} per run")  # fmt: skip
        lines += [f"## Sweep `{sig}`{' (latest)' if i == 0 else ''}", "", f"Settings: `{json.dumps(summary)}`", "",
                  _table(methods), f"![validation loss]({png})", "", "### Against the paper", ""]  # fmt: skip
        claims = _claims(methods)
        lines += claims or ["- (too few methods in this sweep to compare)"]
        main = [m for m in MAIN if m in methods]
        if len(main) >= 3:
            ours = sorted(main, key=lambda m: statistics.mean(methods[m]["val"].values()))
            dense = sorted(main, key=lambda m: PAPER[m][0])
            moe = sorted(main, key=lambda m: PAPER[m][1])
            lines += ["", f"- Ranking, best first: ours {' < '.join(ours)}; paper dense {' < '.join(dense)} (ties "
                      f"as listed); paper MoE {' < '.join(moe)}. Kendall tau vs dense {_kendall(ours, dense):+.2f}, "
                      f"vs MoE {_kendall(ours, moe):+.2f}."]  # fmt: skip
        lines += ["", f"Runs on: {', '.join(devices)}; git {', '.join(shas)}.", ""]
    rec.write_text(f"{SUITE}.md", "\n".join(lines))
    print(f"results: {rec.csv_path} (+ {SUITE}.md, {SUITE}.png)")
    return 0
