"""``--family deberta-v2|modernbert``: the ByteTransformer length protocol for the non-BERT encoder families.

Base-size random-weight models (DeBERTa-v3-base: 12 layers, 768, 12 x 64, FFN 3072, 256 log buckets, shared keys;
ModernBERT-base: 22 layers, 768, 12 x 64, GeGLU 1152, a global layer every third, local window 128), lengths
uniform integers in ``[0.2 S, S]`` (fixed seeds, several for ``B = 1``), per ``(family, B, S)``:

* ``hf-eager`` / ``hf-sdpa``: HF ``AutoModel`` on the right-padded batch (DeBERTa-v2 has no sdpa path in HF);
* ``trimformer-eager``: our packed model (``forward_packed``) called per batch;
* ``trimformer-graph``: the same forward replayed from a CUDA graph (static batch).

Every provider runs the whole model (embeddings + layers) and is timed per call with CUDA events (median ms). The
table also reports the max-abs difference of our output to HF's (same dtype) on the valid tokens.

Runs standalone (``python -m trimformer.bench.encoder_families``) and through :func:`run_family` (the ``encoder``
suite's ``--family`` flag). Rows go to ``benchmarks/results/<device>/encoder-families.csv``; ``.md`` and ``.png``
are rendered from this run.
"""

# ruff: noqa: B023  (every closure below is called within the loop iteration that defines it)
from __future__ import annotations

import argparse
import statistics
import time

FAMILIES = ("deberta-v2", "modernbert")
PROVIDERS = ("hf-eager", "hf-sdpa", "trimformer-eager", "trimformer-graph")


def base_config(family: str):
    """The HF config of the base-size model of ``family`` (random weights are drawn from it)."""
    import transformers as T

    if family == "deberta-v2":
        return T.DebertaV2Config(
            vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512, relative_attention=True, position_buckets=256, max_relative_positions=-1,
            pos_att_type="p2c|c2p", norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
            type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu",
        )  # fmt: skip
    if family == "modernbert":
        return T.ModernBertConfig(
            vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
            max_position_embeddings=8192, local_attention=128, global_attn_every_n_layers=3,
        )  # fmt: skip
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="all", help=f"comma list of {', '.join(FAMILIES)}, or all")
    parser.add_argument("--batches", default="1,16", help="batch sizes B")
    parser.add_argument("--seqs", default="128,256,512", help="max sequence lengths S")
    parser.add_argument("--dtype", default="float16", help="float16 or bfloat16")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--small-batch-seeds", type=int, default=3, help="seeds per point for B = 1")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per provider and point")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")


class FamilyModels:
    """One family's base-size model in one dtype: HF (eager, sdpa when supported) and ours, same random weights."""

    def __init__(self, family: str, dtype, tmp) -> None:
        import torch
        from transformers import AutoModel

        from trimformer import Encoder

        torch.manual_seed(0)
        AutoModel.from_config(base_config(family)).eval().save_pretrained(tmp)
        self.hf = {}
        for attn in ("eager", "sdpa"):
            try:
                self.hf[attn] = AutoModel.from_pretrained(tmp, attn_implementation=attn, dtype=dtype).cuda().eval()
            except (ValueError, NotImplementedError):  # DeBERTa-v2 has no sdpa attention in HF
                continue
        self.enc = Encoder.from_pretrained(tmp, device="cuda", dtype=dtype)
        self.model = self.enc.model


def _point(b: int, s: int, seed: int, vocab: int):
    import torch

    from trimformer.bench.common import bytetransformer_lengths
    from trimformer.ops.varlen import PackedBatch

    lens = bytetransformer_lengths(b, s, seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(5, vocab, (n,), generator=gen) for n in lens]
    ids = torch.zeros(b, max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, : len(x)], mask[i, : len(x)] = x, 1
    batch = PackedBatch.from_token_lists([x.tolist() for x in seqs], device="cuda")
    return sum(lens), ids.cuda(), mask.cuda(), batch


def run_family(args, rec, log, md) -> dict:
    """Time every provider at every ``(family, B, S)`` of ``args``; add rows to ``rec`` and a table to ``md``.

    Returns:
        ``{family: {B: {provider: ([S...], [ms...])}}}`` for the plots.
    """
    import math

    import torch

    from trimformer.bench.common import capture_cuda_graph, int_list, markdown_table, time_cuda

    families = list(FAMILIES) if args.family == "all" else [f.strip() for f in args.family.split(",") if f.strip()]
    for f in families:
        base_config(f)  # validates the name
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"unknown providers {sorted(unknown)}; expected {', '.join(PROVIDERS)}")
    dtype = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(
        args.dtype
    )
    if dtype is None:
        raise ValueError(f"--dtype must be float16 or bfloat16, got {args.dtype!r}")
    plots: dict = {}
    for family in families:
        t0 = time.perf_counter()
        models = FamilyModels(family, dtype, args.tmp / family)
        model = models.model
        log(f"[{family}: models ready in {time.perf_counter() - t0:.0f} s]")
        rows = []
        for b in int_list(args.batches):
            for s in int_list(args.seqs):
                seeds = range(args.seed, args.seed + (args.small_batch_seeds if b == 1 else 1))
                med: dict[str, list[float]] = {p: [] for p in names}
                toks, diffs = [], []
                for seed in seeds:
                    tokens, ids, mask, batch = _point(b, s, seed, models.model.config.vocab_size)
                    toks.append(tokens)
                    fns = {}
                    for attn in ("eager", "sdpa"):
                        if f"hf-{attn}" in names and attn in models.hf:
                            fns[f"hf-{attn}"] = lambda m=models.hf[attn]: m(input_ids=ids, attention_mask=mask)
                    if "trimformer-eager" in names:
                        fns["trimformer-eager"] = lambda: model.forward_packed(batch)
                    with torch.inference_mode():
                        if "trimformer-graph" in names:
                            try:
                                fns["trimformer-graph"] = capture_cuda_graph(lambda: model.forward_packed(batch))
                            except RuntimeError as exc:
                                log(f"  trimformer-graph B={b} S={s}: not capturable ({str(exc)[:120]})")
                        ref = next(iter(models.hf.values()))(input_ids=ids, attention_mask=mask).last_hidden_state
                        ours = model.forward_packed(batch)
                        diffs.append((ours.float() - ref[mask.bool()].float()).abs().max().item())
                        for name, fn in fns.items():
                            samples = time_cuda(fn, warmup=3, repeat=args.iters)
                            m = statistics.median(samples)
                            med[name].append(m)
                            rec.add(f"{family}-B{b}-S{s}", name, "forward", "ms", samples, family=family, batch=b,
                                    max_seqlen=s, seed=seed, tokens=tokens, dtype=args.dtype,
                                    tokens_per_s=tokens / (m * 1e-3))  # fmt: skip
                    del fns
                avg = {p: (sum(v) / len(v) if v else math.nan) for p, v in med.items()}
                hf_best = min((avg[p] for p in ("hf-eager", "hf-sdpa") if p in avg and avg[p] == avg[p]),
                              default=math.nan)  # fmt: skip
                ours = min(avg.get("trimformer-graph", math.nan), avg.get("trimformer-eager", math.nan))
                ours = avg.get("trimformer-eager", math.nan) if ours != ours else ours
                tok = sum(toks) / len(toks)
                rows.append([family, b, s, round(tok), *[avg[p] for p in names], hf_best / ours,
                             hf_best / avg.get("trimformer-eager", math.nan), max(diffs)])  # fmt: skip
                log(f"{family} B={b:3d} S={s:4d} tok={tok:6.0f} " + " ".join(f"{p}={avg[p]:.3f}" for p in names)
                    + f" best-HF/ours={hf_best / ours:.2f}x maxdiff={max(diffs):.2e}")  # fmt: skip
                for p in names:
                    xs, ys = plots.setdefault(family, {}).setdefault(b, {}).setdefault(p, ([], []))
                    xs.append(s)
                    ys.append(avg[p])
        headers = ["family", "B", "S", "valid tok", *[f"{p} ms" for p in names], "best HF / best ours",
                   "best HF / ours eager", f"max abs diff vs HF ({args.dtype})"]  # fmt: skip
        md.append(f"\n## {family} (base size), {args.dtype}: median ms per forward (B = 1: mean over "
                  f"{args.small_batch_seeds} seeds)\n\n")  # fmt: skip
        md.append(markdown_table(headers, rows))
        models = model = None
        torch.cuda.empty_cache()
    return plots


def run(args) -> int:
    """Standalone entry point: run :func:`run_family`, write CSV, Markdown and one PNG (B = 16, every family)."""
    import tempfile
    from pathlib import Path

    import torch

    from trimformer.bench.common import Recorder, line_plot

    if not torch.cuda.is_available():
        raise ValueError("the encoder-families benchmark needs a CUDA GPU")
    rec = Recorder.for_suite("encoder-families", args.out)
    md = [
        f"# encoder families\n\n{rec.env_line()}\n\nRandom-weight base-size models, lengths uniform in [0.2 S, S] "
        "(ByteTransformer protocol), right-padded batches for HF, packed batches for trimformer.\n"
    ]
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        plots = run_family(args, rec, lambda msg: print(msg, flush=True), md)
    rec.write_csv()
    rec.write_text("encoder-families.md", "".join(md))
    series = {}
    for family, by_b in plots.items():
        b = 16 if 16 in by_b else max(by_b)
        for provider, xy in by_b[b].items():
            series[f"{family} {provider}"] = xy
    if series:
        line_plot(rec.out_dir / "encoder-families.png", series, title=f"B=16 forward latency, {args.dtype}",
                  xlabel="max sequence length S", ylabel="ms per forward (median)", logy=True)  # fmt: skip
    print("".join(md))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trimformer.bench.encoder_families", description=__doc__)
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/)")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
