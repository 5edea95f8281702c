"""``trimformer bench encoder``: the ByteTransformer protocol for BERT-base on one GPU, with today's baselines.

Parts (``--part``, comma list or ``all``):

* ``latency``: BERT-base (12 layers, 768, 12 x 64, FFN 3072, random weights, no pooler), lengths uniform integers
  in ``[0.2 S, S]`` (fixed seeds; ``--small-batch-seeds`` of them for ``B <= 2``), per ``(dtype, B, S)``:
  HF ``BertModel`` eager and sdpa on the padded batch, HF sdpa + ``torch.compile`` (``--compile``), a plain-PyTorch
  packed encoder (``F.linear`` + ``varlen_attn`` + ``F.layer_norm`` + ``F.gelu``) replayed from a CUDA graph (the
  competent-user baseline), and trimformer (``Encoder`` on the packed batch, CUDA graphs up to the run's largest
  batch like the baseline; eager too). Every provider runs the full model (embeddings + 12 layers) and is timed per
  call with CUDA events (median).
* ``attention``: the MHA-only microbenchmark at ``B = 16`` (the ``attention-kernel`` suite's point function).
* ``ladder``: the fusion ladder at ``B = 16``: padded HF sdpa -> packed GEMMs (plain PyTorch) -> + fused
  bias/residual/LayerNorm -> + fused bias/GELU -> + our attention (= trimformer eager) -> + CUDA graphs; every rung
  eager and, to show its GPU time, replayed from a CUDA graph.
* ``gemm``: the FFN GEMM ``[T, 768] x [768, 3072]`` + bias + erf GELU: cuBLAS + ``F.gelu``, cuBLAS + our fused
  bias-GELU kernel, our Triton GEMM with the epilogue (default and ``--gemm-sweep`` configs); bias-free GEMMs too.
* ``e2e``: all-MiniLM-L6-v2 end to end (tokenization included) on ``--texts`` mixed-length texts: trimformer
  ``Encoder.embed`` vs ``SentenceTransformer.encode`` in fp16 and fp32 (``--st-texts``: sentence-transformers on a
  prefix of the same texts), with the cosine of every provider's embeddings against sentence-transformers fp32.
* ``tuner``: the per-shape GEMM choices ``linear(impl="auto")`` measured in this process (``ops/linear/tune.py``).
* ``profile``: per-kernel GPU time of trimformer's graphed forward at ``B`` = 1 and 16, ``S`` in ``--ladder-seqs``.

Without the CLI: ``python -m trimformer.bench.encoder --part ... --out DIR``.

Rows go to ``benchmarks/results/<device>/encoder.csv``; ``encoder.md`` and PNG plots are rendered from this run.
"""

# ruff: noqa: B023  (every closure below is called within the loop iteration that defines it)
from __future__ import annotations

import argparse
import math
import statistics
import time
from types import SimpleNamespace

PARTS = ("latency", "attention", "ladder", "gemm", "e2e", "tuner", "profile")
E2E_DEFAULT = "trimformer fp16,sentence-transformers fp16,sentence-transformers fp32"
BERT_BASE = dict(hidden=768, heads=12, layers=12, ffn=3072, vocab=30522, positions=1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="bert",
                        help="bert (default: the parts below), deberta-v2, modernbert or a comma list of the last two "
                             "(base-size models vs HF eager/sdpa; see trimformer.bench.encoder_families)")  # fmt: skip
    parser.add_argument("--part", default="all", help=f"comma list of {', '.join(PARTS)}, or all")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64", help="batch sizes B")
    parser.add_argument("--seqs", default="64,128,256,384,512,768,1024", help="max sequence lengths S")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma list of float16, bfloat16")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--small-batch-seeds", type=int, default=3, help="seeds per point for B <= 2")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per provider and point")
    parser.add_argument("--providers", default="hf-eager,hf-sdpa,packed-graph,trimformer,trimformer-eager",
                        help="latency providers (add hf-compile for HF sdpa + torch.compile)")  # fmt: skip
    parser.add_argument("--ladder-seqs", default="128,512,1024", help="S values of the fusion ladder (B = 16)")
    parser.add_argument("--gemm-tokens", default="128,1024,4096,8192,19200", help="M values of the gemm part")
    parser.add_argument("--gemm-sweep", action="store_true", help="also time alternative Triton GEMM configs")
    parser.add_argument("--model", default=None, help="MiniLM folder for e2e (default: the packaged one)")
    parser.add_argument("--texts", type=int, default=100_000, help="texts of the e2e part")
    parser.add_argument("--st-batch", type=int, default=32, help="sentence-transformers encode batch size")
    parser.add_argument(
        "--st-texts",
        type=int,
        default=None,
        help="texts for the sentence-transformers providers (a prefix of the same texts; default all)",
    )
    parser.add_argument("--e2e-providers", default=E2E_DEFAULT,
                        help="e2e providers (also: trimformer fp32)")  # fmt: skip


def _time(fn, iters: int, warmup: int = 3) -> list[float]:
    from trimformer.bench.common import time_cuda

    return time_cuda(fn, warmup=warmup, repeat=iters)


# ------------------------------------------------------------------------------------------------ models


def graph_tokens(batches: list[int], seqs: list[int]) -> int:
    """CUDA-graph token limit for a run over these ``B`` and ``S``: the bucket of the largest possible batch
    (``max B x max S`` tokens), at least the engine's default. The packed baseline always replays a graph, so
    trimformer must too for a fair comparison (with the engine default, B = 64, S = 512 ran eagerly)."""
    from trimformer.engine.cuda_graphs import DEFAULT_MAX_TOKENS, token_bucket

    return max(DEFAULT_MAX_TOKENS, token_bucket(max(batches) * max(seqs)))


class Models:
    """BERT-base in one dtype: HF (eager, sdpa) and trimformer's ``Encoder`` with the same random weights; the
    Encoder captures CUDA graphs up to ``max_graph_tokens`` tokens (default: the engine's)."""

    def __init__(self, dtype, tmp, max_graph_tokens: int | None = None):
        import torch
        from transformers import BertConfig, BertModel

        from trimformer import Encoder
        from trimformer.engine.cuda_graphs import DEFAULT_MAX_TOKENS

        c = BERT_BASE
        cfg = BertConfig(hidden_size=c["hidden"], num_attention_heads=c["heads"], num_hidden_layers=c["layers"],
                         intermediate_size=c["ffn"], vocab_size=c["vocab"], max_position_embeddings=c["positions"],
                         hidden_act="gelu")  # fmt: skip
        torch.manual_seed(0)
        hf = BertModel(cfg, add_pooling_layer=False).eval()
        hf.save_pretrained(tmp)
        self.hf = {}
        for attn in ("eager", "sdpa"):
            m = BertModel.from_pretrained(tmp, attn_implementation=attn, add_pooling_layer=False, dtype=dtype)
            self.hf[attn] = m.to("cuda").eval()
        self.enc = Encoder.from_pretrained(
            tmp, device="cuda", dtype=dtype, cuda_graph_tokens=max_graph_tokens or DEFAULT_MAX_TOKENS
        )
        self.model = self.enc.model
        self.dtype = dtype
        self._compiled = None

    def compiled(self):
        import torch

        if self._compiled is None:
            self._compiled = torch.compile(self.hf["sdpa"], dynamic=True)
        return self._compiled


def plain_packed_forward(model, ids, pos, cu, max_seqlen, *, fused_ln=False, fused_gelu=False, our_attn=False):
    """The "50-line" packed encoder on ``model``'s weights: ``F.linear`` + ``varlen_attn`` + add + ``F.layer_norm``
    + ``F.gelu``; the flags swap in trimformer's fused LayerNorm, fused bias-GELU and attention (the ladder)."""
    import torch.nn.functional as F
    from torch.nn.attention.varlen import varlen_attn

    from trimformer.ops.attention import varlen_attention
    from trimformer.ops.linear import linear
    from trimformer.ops.norm import add_layer_norm

    emb = model.embeddings
    x = F.embedding(ids, emb.word.weight) + F.embedding(pos, emb.position.weight) + emb.token_type.weight[0]
    h = F.layer_norm(x, (x.shape[-1],), emb.norm.weight, emb.norm.bias, emb.eps)
    t = h.shape[0]
    for index in model.schedule:
        layer = model.layers[index]
        qkv = F.linear(h, layer.qkv.weight, layer.qkv.bias).view(t, 3, layer.num_heads, layer.head_dim)
        q, k, v = qkv.unbind(1)
        if our_attn:
            a = varlen_attention(q, k, v, cu, max_seqlen, impl="triton")
        else:
            a = varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)
        a = a.reshape(t, -1)
        if fused_ln:
            h = add_layer_norm(F.linear(a, layer.out.weight), h, layer.attn_norm.weight, layer.attn_norm.bias,
                               eps=layer.eps, x_bias=layer.out.bias, inplace=True, impl="triton")  # fmt: skip
        else:
            y = F.linear(a, layer.out.weight, layer.out.bias) + h
            h = F.layer_norm(y, (y.shape[-1],), layer.attn_norm.weight, layer.attn_norm.bias, layer.eps)
        if fused_gelu:
            f = linear(h, layer.ffn_in.weight, layer.ffn_in.bias, layer.activation)
        else:
            f = F.gelu(F.linear(h, layer.ffn_in.weight, layer.ffn_in.bias))
        if fused_ln:
            h = add_layer_norm(F.linear(f, layer.ffn_out.weight), h, layer.ffn_norm.weight, layer.ffn_norm.bias,
                               eps=layer.eps, x_bias=layer.ffn_out.bias, inplace=True, impl="triton")  # fmt: skip
        else:
            y = F.linear(f, layer.ffn_out.weight, layer.ffn_out.bias) + h
            h = F.layer_norm(y, (y.shape[-1],), layer.ffn_norm.weight, layer.ffn_norm.bias, layer.eps)
    return h


class Point:
    """One ``(B, S, seed)`` input in every layout the providers need."""

    def __init__(self, b, s, seed):
        import torch

        from trimformer.bench.common import bytetransformer_lengths

        self.b, self.s, self.seed = b, s, seed
        self.lens = bytetransformer_lengths(b, s, seed)
        self.tokens = sum(self.lens)
        g = torch.Generator().manual_seed(seed)
        lists = [torch.randint(1000, 30000, (n,), generator=g).tolist() for n in self.lens]
        from trimformer.ops.varlen import PackedBatch

        self.batch = PackedBatch.from_token_lists(lists, device="cuda")
        ids = torch.zeros(b, s, dtype=torch.long)
        mask = torch.zeros(b, s, dtype=torch.long)
        for i, x in enumerate(lists):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        self.ids, self.mask = ids.cuda(), mask.cuda()


def _providers(models: Models, p: Point, names: list[str]):
    import torch

    from trimformer.bench.common import capture_cuda_graph

    out = {}
    inf = torch.inference_mode
    if "hf-eager" in names:
        out["hf-eager"] = lambda: models.hf["eager"](input_ids=p.ids, attention_mask=p.mask)
    if "hf-sdpa" in names:
        out["hf-sdpa"] = lambda: models.hf["sdpa"](input_ids=p.ids, attention_mask=p.mask)
    if "hf-compile" in names:
        out["hf-compile"] = lambda: models.compiled()(input_ids=p.ids, attention_mask=p.mask)
    b = p.batch
    if "packed-graph" in names:
        with inf():
            out["packed-graph"] = capture_cuda_graph(
                lambda: plain_packed_forward(models.model, b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen)
            )
    if "trimformer" in names:
        out["trimformer"] = lambda: models.enc._forward(b)  # CUDA graph (limit: graph_tokens of the run's sizes)
    if "trimformer-eager" in names:
        out["trimformer-eager"] = lambda: models.model.forward_packed(b)
    return out


def _part_latency(args, rec, log, md):
    import torch

    from trimformer.bench.common import int_list, line_plot, markdown_table

    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    cols = ["hf-eager", "hf-sdpa", "hf-compile", "packed-graph", "trimformer", "trimformer-eager"]
    cols = [c for c in cols if c in names]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name.strip())
        models = Models(dtype, args.tmp / dtype_name, graph_tokens(int_list(args.batches), int_list(args.seqs)))
        rows, plot = [], {}
        for b in int_list(args.batches):
            for s in int_list(args.seqs):
                seeds = range(args.seed, args.seed + (args.small_batch_seeds if b <= 2 else 1))
                med = {c: [] for c in cols}
                toks = []
                for seed in seeds:
                    p = Point(b, s, seed)
                    toks.append(p.tokens)
                    with torch.inference_mode():
                        for name, fn in _providers(models, p, cols).items():
                            try:
                                samples = _time(fn, args.iters)
                            except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
                                log(f"  {name} B={b} S={s}: skipped ({type(exc).__name__}: {str(exc)[:120]})")
                                continue
                            m = statistics.median(samples)
                            med[name].append(m)
                            rec.add(f"latency-B{b}-S{s}", name, "forward", "ms", samples, batch=b, max_seqlen=s,
                                    seed=seed, tokens=p.tokens, dtype=dtype_name,
                                    tokens_per_s=p.tokens / (m * 1e-3))  # fmt: skip
                    del p
                avg = {c: (sum(v) / len(v) if v else float("nan")) for c, v in med.items()}
                tok = sum(toks) / len(toks)
                ours = avg.get("trimformer", float("nan"))
                row = [b, s, round(tok), *[avg[c] for c in cols], tok / (ours * 1e-3) / 1e6]
                row += [avg.get("hf-sdpa", math.nan) / ours, avg.get("packed-graph", math.nan) / ours]
                rows.append(row)
                log(f"{dtype_name} B={b:3d} S={s:5d} tok={tok:7.0f} " + " ".join(f"{c}={avg[c]:.3f}" for c in cols))
                if b in (1, 16, 64):
                    for c in cols:
                        xs, ys = plot.setdefault(b, {}).setdefault(c, ([], []))
                        xs.append(s)
                        ys.append(avg[c])
        headers = ["B", "S", "valid tok", *[f"{c} ms" for c in cols], "ours M tok/s", "HF sdpa / ours",
                   "packed graph / ours"]  # fmt: skip
        md.append(f"\n## BERT-base forward latency, {dtype_name} (median ms per call; B <= 2: mean over "
                  f"{args.small_batch_seeds} seeds)\n\n")  # fmt: skip
        md.append(markdown_table(headers, rows))
        for b, series in plot.items():
            line_plot(rec.out_dir / f"encoder-latency-{dtype_name}-B{b}.png", series,
                      title=f"BERT-base, {dtype_name}, B={b}, lengths U[0.2S, S]", xlabel="S",
                      ylabel="ms per forward (median)", logy=True)  # fmt: skip
        del models
        torch.cuda.empty_cache()


def _part_attention(args, rec, log, md):
    from trimformer.bench import attention_kernel
    from trimformer.bench.common import int_list, markdown_table

    ns = SimpleNamespace(seed=args.seed, sweep="", rep_ms=50)
    rows = []
    for s in int_list(args.seqs):
        total, flops, med, gmed = attention_kernel._bt_point(ns, rec, log, 16, s)
        names = ("unfused-padded", "sdpa-padded", "varlen_attn", "ours")
        g = [gmed.get(n, math.nan) for n in names]
        rows.append([16, s, total, *g, g[2] / g[3], g[1] / g[3], g[0] / g[3]])
    md.append("\n## MHA only (B = 16, 12 x 64, fp16), kernel time in a CUDA graph, ms\n\n")
    md.append(markdown_table(["B", "S", "tokens", "unfused padded", "SDPA padded", "varlen_attn", "ours",
                              "varlen/ours", "SDPA/ours", "unfused/ours"], rows))  # fmt: skip


def _part_ladder(args, rec, log, md):
    import torch

    from trimformer.bench.common import int_list, markdown_table, time_cuda_graph
    from trimformer.ops.linear import api as linear_api

    dtype = getattr(torch, args.dtypes.split(",")[0].strip())
    models = Models(dtype, args.tmp / f"ladder-{dtype}")
    rows = []
    for s in int_list(args.ladder_seqs):
        p = Point(16, s, args.seed)
        b = p.batch
        fwd = lambda **kw: plain_packed_forward(  # noqa: E731
            models.model, b.input_ids, b.position_ids, b.cu_seqlens, b.max_seqlen, **kw
        )
        rungs = {
            "0 HF sdpa (padded)": lambda: models.hf["sdpa"](input_ids=p.ids, attention_mask=p.mask),
            "1 packed GEMMs (PyTorch)": lambda: fwd(),
            "2 + fused LayerNorm": lambda: fwd(fused_ln=True),
            "3 + fused bias-GELU": lambda: fwd(fused_ln=True, fused_gelu=True),
            "4 + our attention": lambda: fwd(fused_ln=True, fused_gelu=True, our_attn=True),
            "5 trimformer (+ CUDA graphs)": lambda: models.enc._forward(b),
        }
        res = {}
        with torch.inference_mode():
            for name, fn in rungs.items():
                eager = statistics.median(_time(fn, args.iters))
                graphed = statistics.median(time_cuda_graph(fn, repeat=args.iters)) if name[0] in "1234" else eager
                res[name] = (eager, graphed)
                for metric, v in (("forward", eager), ("forward (cuda graph)", graphed)):
                    rec.add(f"ladder-B16-S{s}", name, metric, "ms", v, batch=16, max_seqlen=s, tokens=p.tokens,
                            dtype=str(dtype).replace("torch.", ""))  # fmt: skip
            old = dict(linear_api.EPILOGUE_POLICY)
            for mode in ("never", "always"):  # rung 3 both ways: cuBLAS + fused kernel vs Triton GEMM epilogue
                linear_api.EPILOGUE_POLICY["mode"] = mode
                v = statistics.median(time_cuda_graph(lambda: fwd(fused_ln=True, fused_gelu=True), repeat=args.iters))
                res[f"3 + fused bias-GELU [{mode} GEMM epilogue]"] = (math.nan, v)
                rec.add(f"ladder-B16-S{s}", f"3 epilogue={mode}", "forward (cuda graph)", "ms", v, batch=16,
                        max_seqlen=s, tokens=p.tokens)  # fmt: skip
            linear_api.EPILOGUE_POLICY.update(old)
        for name, (e, g) in res.items():
            rows.append([s, p.tokens, name, e, g, p.tokens / (g * 1e-3) / 1e6])
        log(f"ladder S={s}: " + "; ".join(f"{n}: {e:.3f}/{g:.3f}" for n, (e, g) in res.items()))
    md.append(f"\n## Fusion ladder, B = 16, {dtype} (ms per forward: eager / replayed from a CUDA graph)\n\n")
    md.append(markdown_table(["S", "valid tok", "rung", "eager ms", "graph ms", "graph M tok/s"], rows))


def _part_gemm(args, rec, log, md):
    import torch
    import torch.nn.functional as F
    import triton.testing

    from trimformer.bench.common import int_list, markdown_table
    from trimformer.ops.activation import bias_act
    from trimformer.ops.linear.gemm import GemmConfig, default_config, linear_fwd
    from trimformer.ops.triton_utils import num_sms

    bench = lambda fn: statistics.median(triton.testing.do_bench(fn, warmup=25, rep=60, return_mode="all"))  # noqa: E731
    rows = []
    sweep = [GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 8, 3), GemmConfig(128, 128, 64, 8, 4, 4),
             GemmConfig(64, 256, 64, 8, 8, 3), GemmConfig(128, 128, 32, 8, 4, 5), GemmConfig(64, 128, 64, 8, 4, 4),
             GemmConfig(128, 64, 64, 8, 4, 4), GemmConfig(64, 64, 64, 8, 4, 4)]  # fmt: skip
    for dtype in (torch.float16,):
        for m in int_list(args.gemm_tokens):
            for n, k, act in ((3072, 768, "gelu"), (2304, 768, None), (768, 768, None), (768, 3072, None)):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
                bias = torch.randn(n, device="cuda", dtype=dtype)
                kind = "gelu_erf" if act else "identity"
                res = {}
                if act:
                    res["cublas+F.gelu"] = bench(lambda: F.gelu(F.linear(x, w, bias)))
                    res["cublas+fused bias-gelu"] = bench(lambda: bias_act(F.linear(x, w), bias, act, inplace=True))
                else:
                    res["cublas"] = bench(lambda: F.linear(x, w, bias))
                res["triton"] = bench(lambda: linear_fwd(x, w, bias, kind))
                if args.gemm_sweep:
                    for c in sweep:
                        res[f"triton {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"] = bench(
                            lambda c=c: linear_fwd(x, w, bias, kind, config=c)
                        )
                flops = 2.0 * m * n * k
                best = min((v, name) for name, v in res.items() if name.startswith("triton"))
                base = res.get("cublas+fused bias-gelu", res.get("cublas"))
                for name, v in res.items():
                    rec.add(f"gemm-M{m}-N{n}-K{k}", name, "time", "ms", v, m=m, n=n, k=k, act=act or "none",
                            tflops=flops / (v * 1e-3) / 1e12)  # fmt: skip
                cfg = default_config(m, n, k, dtype, num_sms(x.device))
                rows.append([m, n, k, act or "-", base, res["triton"], best[0], best[1], base / res["triton"],
                             flops / (res["triton"] * 1e-3) / 1e12, str(cfg)[10:]])  # fmt: skip
                log(f"gemm M={m} N={n} K={k} act={act}: " + " ".join(f"{a}={v:.4f}" for a, v in res.items()))
    md.append(
        "\n## GEMMs of BERT-base (fp16, ms, `do_bench`): cuBLAS (+ fused bias-GELU kernel) vs Triton epilogue\n\n"
    )
    md.append(markdown_table(["M", "N", "K", "act", "cuBLAS path", "triton default", "triton best", "best config",
                              "cuBLAS/triton", "triton TFLOP/s", "default config"], rows))  # fmt: skip


def _part_e2e(args, rec, log, md):
    import torch

    from trimformer import Encoder
    from trimformer.bench.common import markdown_table
    from trimformer.bench.embed_cpu import make_texts

    enc16 = Encoder.from_pretrained(args.model, device="cuda", dtype="float16")
    texts = make_texts(enc16.tokenizer, args.texts, short_frac=0.7, seed=args.seed)
    st_n = min(args.st_texts or len(texts), len(texts))
    n_tok = {len(texts): enc16.tokenize(texts).num_tokens, st_n: enc16.tokenize(texts[:st_n]).num_tokens}
    path = enc16.name_or_path
    log(f"e2e: {len(texts)} texts, {n_tok[len(texts)]} tokens")
    names = [n.strip() for n in args.e2e_providers.split(",") if n.strip()]
    builders = {
        "trimformer fp16": lambda: enc16.embed,
        "trimformer fp32": lambda: Encoder.from_pretrained(path, device="cuda", dtype="float32").embed,
        "sentence-transformers fp16": lambda: _st(path, torch.float16, args.st_batch),
        "sentence-transformers fp32": lambda: _st(path, torch.float32, args.st_batch),
    }
    res, outs, counts = {}, {}, {}
    for name in names:
        fn = builders[name]()
        subset = texts if name.startswith("trimformer") else texts[:st_n]
        fn(texts[:2000])  # warm: kernels, GEMM choices, graphs for the common buckets
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(subset)
        torch.cuda.synchronize()
        res[name] = time.perf_counter() - t0
        outs[name] = torch.as_tensor(out).float().cpu()
        counts[name] = len(subset)
        tok = n_tok[len(subset)]
        rec.add("e2e-minilm", name, "embed", "s", res[name], texts=len(subset), tokens=tok,
                texts_per_s=len(subset) / res[name], tokens_per_s=tok / res[name])  # fmt: skip
        log(f"e2e {name}: {len(subset)} texts in {res[name]:.2f} s, {len(subset) / res[name]:.0f} texts/s")
        del fn
    ref_name = "sentence-transformers fp32" if "sentence-transformers fp32" in outs else None
    rows = []
    rate = {name: counts[name] / v for name, v in res.items()}
    for name, v in res.items():
        cos_min = cos_mean = math.nan
        if ref_name is not None:
            n = min(counts[name], counts[ref_name])
            ref = torch.nn.functional.normalize(outs[ref_name][:n], dim=-1)
            cos = torch.nn.functional.cosine_similarity(torch.nn.functional.normalize(outs[name][:n], dim=-1), ref)
            cos_min, cos_mean = cos.min().item(), cos.mean().item()
            rec.add("e2e-minilm", name, "cosine vs ST fp32 (min)", "1", cos_min, texts=n)
        st16 = rate.get("sentence-transformers fp16", math.nan)
        st32 = rate.get("sentence-transformers fp32", math.nan)
        rows.append([name, counts[name], v, rate[name], n_tok[counts[name]] / v / 1e6, rate[name] / st16,
                     rate[name] / st32, cos_min, cos_mean])  # fmt: skip
    md.append(f"\n## all-MiniLM-L6-v2 end to end (tokenization included), mixed-length texts ({len(texts):,} texts, "
              f"{n_tok[len(texts)]:,} tokens; sentence-transformers on the first {st_n:,})\n\n")  # fmt: skip
    md.append(markdown_table(["provider", "texts", "s", "texts/s", "M tok/s", "throughput vs ST fp16",
                              "throughput vs ST fp32", "min cosine vs ST fp32", "mean cosine"], rows))  # fmt: skip


def _st(path, dtype, batch):
    """``SentenceTransformer.encode`` in ``dtype`` on CUDA (its checkpoint dtype is fp16; fp32 is its usual default)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(path, device="cuda").to(dtype)
    return lambda t: st.encode(t, batch_size=batch, convert_to_tensor=True)


def _part_tuner(args, rec, log, md):
    """The GEMM choices ``linear(impl="auto")`` measured during this run (``trimformer/ops/linear/tune.py``)."""
    from trimformer.bench.common import markdown_table
    from trimformer.ops.linear import tune

    rows = []
    for key, times in sorted(tune.MEASURED.items(), key=lambda kv: (str(kv[0][4]), kv[0][:4])):
        m, n, k, kind, dtype = key[:5]
        best = min(times, key=times.get)
        cfg = best if best == "cublas" else best.replace("GemmConfig", "")
        rows.append([str(dtype).replace("torch.", ""), m, n, k, kind, times["cublas"], times[best],
                     times["cublas"] / times[best], cfg])  # fmt: skip
        rec.add(f"tune-M{m}-N{n}-K{k}", kind, "best", "ms", times[best], cublas_ms=times["cublas"], choice=cfg)
    md.append(
        '\n## GEMM choices of `linear(impl="auto")` (row bucket = next power of two; '
        "ms per call: median of 7 CUDA-graph replays)\n\n"
    )
    md.append(markdown_table(["dtype", "M bucket", "N", "K", "act", "cuBLAS path ms", "chosen ms", "speedup",
                              "choice"], rows))  # fmt: skip


def _part_profile(args, rec, log, md):
    """Per-kernel GPU time of trimformer's graphed forward (``torch.profiler`` over 10 replays), B = 1 and 16."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trimformer.bench.common import int_list, markdown_table

    dtype = getattr(torch, args.dtypes.split(",")[0].strip())
    models = Models(dtype, args.tmp / f"profile-{dtype}")
    for b in (1, 16):
        for s in int_list(args.ladder_seqs):
            p = Point(b, s, args.seed)
            with torch.inference_mode():
                for _ in range(3):
                    models.enc._forward(p.batch)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        models.enc._forward(p.batch)
                    torch.cuda.synchronize()
            agg: dict[str, list[float]] = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    a = agg.setdefault(ev.name[:80], [0.0, 0.0])
                    a[0] += 0.1
                    a[1] += ev.device_time / 1e4  # us over 10 replays -> ms per forward
            total = sum(v[1] for v in agg.values())
            rows = [[name, n, ms, ms / total] for name, (n, ms) in sorted(agg.items(), key=lambda kv: -kv[1][1])]
            for name, n, ms, _ in rows:
                rec.add(f"profile-B{b}-S{s}", name, "kernel time", "ms", ms, calls=n, tokens=p.tokens)
            log(f"profile B={b} S={s}: {total:.3f} ms of kernels, {sum(r[1] for r in rows):.0f} launches")
            md.append(f"\n## Kernel time per graphed forward, B = {b}, S = {s} ({p.tokens} tokens, {dtype}): "
                      f"{total:.3f} ms in {sum(r[1] for r in rows):.0f} kernels\n\n")  # fmt: skip
            md.append(markdown_table(["kernel", "launches", "ms", "share"], rows[:12]))


def run(args) -> int:
    import tempfile
    from pathlib import Path

    import torch

    from trimformer.bench.common import Recorder

    if args.family != "bert":
        return _run_families(args)
    if not torch.cuda.is_available():
        raise ValueError("the encoder suite needs a CUDA GPU")
    parts = list(PARTS) if args.part == "all" else [p.strip() for p in args.part.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown --part {sorted(unknown)}; expected {', '.join(PARTS)} or all")
    rec = Recorder.for_suite("encoder", args.out)

    def log(msg: str) -> None:
        print(msg, flush=True)

    md = [f"# encoder\n\n{rec.env_line()}\n\nBERT-base, random weights, lengths uniform in [0.2 S, S].\n"]
    runners = {"latency": _part_latency, "attention": _part_attention, "ladder": _part_ladder, "gemm": _part_gemm,
               "e2e": _part_e2e, "tuner": _part_tuner, "profile": _part_profile}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        for part in parts:
            t0 = time.perf_counter()
            runners[part](args, rec, log, md)
            log(f"[{part}: {time.perf_counter() - t0:.0f} s]")
            rec.write_csv()
            rec.rows.clear()
            rec.write_text("encoder.md", "".join(md))
    print("".join(md))
    return 0


def _run_families(args) -> int:
    """``--family deberta-v2|modernbert``: hand the run to :mod:`trimformer.bench.encoder_families` with its own
    defaults, overridden by the options given here where they differ from this suite's defaults."""
    from trimformer.bench import encoder_families as fam

    families = [f.strip() for f in args.family.split(",") if f.strip()]
    unknown = sorted(set(families) - set(fam.FAMILIES))
    if unknown:
        raise ValueError(f"unknown --family {unknown}; expected bert or a comma list of {', '.join(fam.FAMILIES)}")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ours = parser.parse_args([])
    sub = argparse.ArgumentParser()
    fam.add_arguments(sub)
    fargs = sub.parse_args([])
    fargs.family, fargs.out = ",".join(families), args.out
    for name in ("batches", "seqs", "seed", "small_batch_seeds", "iters"):
        if getattr(args, name) != getattr(ours, name):
            setattr(fargs, name, getattr(args, name))
    if args.dtypes != ours.dtypes:
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        if len(dtypes) != 1:
            raise ValueError(f"--family {args.family} runs one dtype; got --dtypes {args.dtypes}")
        fargs.dtype = dtypes[0]
    return fam.run(fargs)


if __name__ == "__main__":  # ``python -m trimformer.bench.encoder --out DIR ...`` (no CLI: the box lacks fastapi)
    import sys

    _parser = argparse.ArgumentParser(prog="python -m trimformer.bench.encoder")
    add_arguments(_parser)
    _parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/)")
    sys.exit(run(_parser.parse_args()))
