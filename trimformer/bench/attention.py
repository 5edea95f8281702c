"""``trimformer bench attention``: whole attention layers, CCA / CCGQA against MHA / GQA / MLA (paper App. D).

Protocol (``cca-spec.md`` section 4): one GPU, bf16, ``E = 2048``, ``d_h`` in {64, 128, 256} (``2048 / d_h`` MHA
heads), ``S`` from 512 to 32k, ``B`` = 1 and 4, causal. Methods are built by
:func:`trimformer.layers.accounting.paper_configs`: MHA, GQA-4, GQA-8, MLA (``c_q = c_kv = 2``, the paper's 4x KV
cache), CCA-4x, CCA-8x and CCGQA-2x/8x (kernels 2 and 2, half the head dims rotated). The timed region is the
**whole layer**, projections included, on dense ``[B, S, E]`` input:

* ``fwd``: prefill forward without autograd (eager, one call; also replayed from a CUDA graph);
* ``fwd+bwd``: forward and backward (a training step's share: input and all parameter gradients);
* ``decode``: one new token per sequence over a cache holding ``context - 1`` tokens, replayed from a CUDA graph.

CCA / CCGQA run ``impl="auto"`` (provider ``ours``): our fused Triton prologue and flash decoding, and for the latent
attention core the fastest of our Triton flash kernel and PyTorch's SDPA backends for the shape (the layer measures
them once per shape; each row records the ``core`` that ran).
Baselines run ``impl="torch"``: each point tries every SDPA backend named by ``--backends`` (and, for grouped heads,
the variant that expands K/V to all query heads; for MHA/GQA also the variant that projects q, k and v as one GEMM)
with a short probe, then times the fastest; eager calls and CUDA-graph replays are probed separately (an eager probe
at short S ranks backends by host overhead, so the graph rows get the backend fastest in GPU time, recorded with
``probe_graph_ms``); the provider column records which one won. Decode baselines are timed on both PyTorch's cache
path (SDPA with a mask, ``torch``) and our flash-decoding kernel (``ours-kernels``). ``--breakdown`` also times the
CCA prologue (its default forward is the folded one-GEMM kernel; ``prologue-triton[folded fwd]``, ``[folded fwd,
weights pre-folded]`` (the kernel without its per-call fold launch), ``[two-kernel fwd]`` (conv1 scratch + conv2 GEMM)
and ``[one-kernel fwd]`` time the forwards one by one) and the attention core alone (our kernel and the fastest SDPA
backend); ``--sweep`` adds prologue launch configurations (``SWEEP_FWD``) and the fp32 ``dY2`` scratch of the
backward.

Eager timings: CUDA events around each call, L2 flushed before every call, median of repeats (p20/p80 kept).
Rows go to ``attention.csv``; ``attention.md`` and the PNG plots are rendered from the rows of the run by
``attention_report.py`` (``--render RUN_ID`` re-renders any run, e.g. after copying rows from another machine).
"""

from __future__ import annotations

import dataclasses
import statistics
from functools import partial

E = 2048
METHODS = ("MHA", "GQA-4", "GQA-8", "MLA", "CCA-4x", "CCA-8x", "CCGQA-2x/8x")
OURS = ("CCA-4x", "CCA-8x", "CCGQA-2x/8x")
_DEV = "cuda"
SWEEP_FWD = ((64, 4, 2), (64, 4, 3), (128, 8, 1), (128, 8, 2), (32, 4, 2))  # --sweep: prologue fwd launch configs
# --sweep: launch configs of the fused projection + prologue (rows, reduction chunk, warps, stages)
SWEEP_PROJECT = ((64, 64, 4, 2), (64, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (128, 64, 4, 3))
# The paper's reported speed-ups at S = 16k over d_h in {64, 128, 256} (cca-spec.md section 4): (mode, method, vs).
PAPER = {
    ("fwd", "CCA-4x", "MHA"): "1.6-1.9 (causal fwd; prefill about 1.7)",
    ("fwd", "CCA-4x", "GQA-8"): "1.3-1.4",
    ("fwd", "CCA-4x", "MLA"): "1.3-1.5",
    ("fwd", "CCGQA-2x/8x", "MHA"): "1.3-1.4",
    ("fwd", "CCGQA-2x/8x", "GQA-8"): "1.1-1.3",
    ("fwd+bwd", "CCA-4x", "MHA"): "1.2-1.3 (backward alone)",
}


def add_arguments(parser) -> None:
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384,32768", help="sequence lengths S")
    parser.add_argument("--head-dims", default="64,128,256", help="latent / MHA head dims d_h")
    parser.add_argument("--batch", default="1,4", help="batch sizes B")
    parser.add_argument("--modes", default="fwd,fwd+bwd,decode", help="comma list of fwd, fwd+bwd, decode")
    parser.add_argument("--decode-contexts", default="4096,16384", help="cache lengths of the decode step")
    parser.add_argument("--backends", default="cudnn,flash,efficient", help="SDPA backends tried for baselines")
    parser.add_argument("--max-tokens", type=int, default=131072, help="skip points with B x S above this")
    parser.add_argument("--cca-torch", action="store_true", help="also time CCA/CCGQA on the PyTorch path")
    parser.add_argument("--breakdown", action="store_true", help="time the CCA prologue and attention core alone")
    parser.add_argument("--breakdown-seqlens", default="4096,16384", help="sequence lengths of --breakdown")
    parser.add_argument("--sweep", action="store_true", help="with --breakdown: other prologue launch configs")
    parser.add_argument("--rep-ms", type=float, default=60.0, help="timing budget per point (ms of GPU time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", default="", help="only re-render attention.md/PNGs from these run ids (comma list)")
    parser.add_argument("--render-appendix", default="", help="with --render: run ids for an appendix section")


def method_configs(head_dim: int) -> dict:
    """The seven attention layers of the comparison at ``E = 2048`` and this head dim."""
    from trimformer.layers.accounting import paper_configs

    heads = E // head_dim
    a = paper_configs(E, heads, head_dim, gqa_groups=4, cca_compression=4, ccgqa=(2, 8))
    b = paper_configs(E, heads, head_dim, gqa_groups=8, cca_compression=8)
    return {"MHA": a["MHA"], "GQA-4": a["GQA-4"], "GQA-8": b["GQA-8"], "MLA": a["MLA-2x/2x"], "CCA-4x": a["CCA-4x"],
            "CCA-8x": b["CCA-8x"], "CCGQA-2x/8x": a["CCGQA-2x/8x"]}  # fmt: skip


_FLUSH: list = []


def _measure(fn, rep_ms: float, grad_to_none=(), min_reps: int = 3) -> list[float]:
    """Milliseconds per eager call (CUDA events, L2 flushed before each call) after one warm-up call."""
    import torch

    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=_DEV))

    def once() -> float:
        for t in grad_to_none:
            t.grad = None
        _FLUSH[0].zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e)

    once()
    first = once()
    n = int(min(200, max(min_reps, rep_ms // max(first, 1e-3))))
    return [first] + [once() for _ in range(n - 1)]


def _median(xs) -> float:
    return statistics.median(xs)


def _sdpa_candidates(args, grouped: bool, fusable: bool = False):
    """``(label, backend, expand_kv, fused_projections)`` for every SDPA backend of ``--backends``; grouped heads add
    the variant that expands K/V to the query heads, ``fusable`` layers the one that projects q/k/v as one GEMM."""
    from torch.nn.attention import SDPBackend

    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    out = []
    for name in [x.strip() for x in args.backends.split(",") if x.strip()]:
        if name not in table:
            raise ValueError(f"unknown SDPA backend {name!r}; expected one of {sorted(table)}")
        for expand in (False, True) if grouped else (False,):
            for fused in (False, True) if fusable else (False,):
                label = f"sdpa-{name}" + ("+expand" if expand else "") + ("+fused-qkv" if fused else "")
                out.append((label, table[name], expand, fused))
    return out


def _with_backend(layer, backend, expand, fused, fn):
    """``fn`` run with one SDPA backend, K/V expansion on or off and (``fused``) the input projections as one GEMM;
    the layer's own settings are restored after each call."""
    from torch.nn.attention import sdpa_kernel

    def run():
        own = layer.sdpa_expand_kv, layer.fused_projection_min_rows
        layer.sdpa_expand_kv = expand
        layer.fused_projection_min_rows = 0 if fused else None
        try:
            with sdpa_kernel([backend]):
                return fn()
        finally:
            layer.sdpa_expand_kv, layer.fused_projection_min_rows = own

    return run


def _layer_point(args, rec, log, cfg, name, layer, b, s, mode, impl):
    """Time one (method, B, S, mode) point; returns ``{provider: median ms}``."""
    import torch

    from trimformer.bench.attention_kernel import _prime_clocks, _try

    gen = torch.Generator(device=_DEV).manual_seed(args.seed + s + b)
    x = torch.randn(b, s, E, device=_DEV, dtype=torch.bfloat16, generator=gen)
    layer.impl = impl
    params = [p for p in layer.parameters()]
    if mode == "fwd":
        xin, grads = x, ()

        def call():
            with torch.no_grad():
                return layer(xin)
    else:
        xin = x.clone().requires_grad_()
        dy = torch.randn(b, s, E, device=_DEV, dtype=torch.bfloat16, generator=gen)
        grads = (xin, *params)

        def call():
            layer(xin).backward(dy)

    grad_mode = torch.no_grad if mode == "fwd" else torch.enable_grad
    case = f"{name}|d{cfg.head_dim}|B{b}|S{s}"
    base = dict(method=name, kind=cfg.kind, head_dim=cfg.head_dim, q_heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                batch=b, seqlen=s, dtype="bfloat16", impl=impl)  # fmt: skip
    res = {}
    if impl == "torch":  # each timing picks its own fastest backend: host overhead decides eager calls, not graphs
        grouped = cfg.num_kv_heads != cfg.num_heads and cfg.kind != "mla"
        cands = _sdpa_candidates(args, grouped, fusable=cfg.kind in ("mha", "gqa"))
        prefix = "pytorch-unfused:" if name in OURS else "pytorch:"
        eager = _probe_backends(layer, cands, call, grads, lambda fn: _median(_measure(fn, 0.0, grads, 1)))
        with grad_mode():
            graph = _probe_backends(layer, cands, call, grads, lambda fn: _median(_graph_ms(fn, 3)))
        if not eager and not graph:
            log(f"  {name} B={b} S={s} {mode}: no SDPA backend ran")
            return res
        probes = {"probe_ms": {k: round(v, 4) for k, v in eager.items()},
                  "probe_graph_ms": {k: round(v, 4) for k, v in graph.items()}}  # fmt: skip
        runs = []
        for timing, probe in (("eager", eager), ("graph", graph)):
            if probe:
                best = min(probe, key=probe.get)
                runs.append((timing, _backend_call(layer, cands, best, call), prefix + best, probes))
    else:
        runs = [("eager", call, "ours", {}), ("graph", call, "ours", {})]
    for timing, fn, provider, extra in runs:
        if timing == "eager":
            _prime_clocks()
            samples = _try(log, f"{name} {mode}", partial(_measure, fn, args.rep_ms, grads))
            metric = mode
        else:  # GPU time without the host's launch gaps (eager calls on a slow host are launch-bound at short S)
            guess = min(res.values()) if res else 1.0
            reps = int(min(20, max(3, args.rep_ms // max(guess, 1e-3))))
            with grad_mode():
                samples = _try(log, f"{name} {mode} graph", partial(_graph_ms, fn, reps))
            metric = f"{mode} (cuda graph)"
        for t in grads:
            t.grad = None
        if samples is None:
            continue
        if name in OURS:  # which attention core the layer ran (impl="auto" routes dense input to the fastest)
            extra = {**extra, "core": layer.core_backend}
        rec.add(case, provider, metric, "ms", samples, **base, **extra)
        res[provider + (" (graph)" if timing == "graph" else "")] = _median(samples)
    return res


def _probe_backends(layer, cands, call, grads, timer) -> dict[str, float]:
    """``{label: ms}`` of every candidate of :func:`_sdpa_candidates` that runs, timed by ``timer(fn)``."""
    from trimformer.bench.attention_kernel import _try

    out = {}
    for label, backend, expand, fused in cands:
        t = _try(lambda *a: None, label, partial(timer, _with_backend(layer, backend, expand, fused, call)))
        for g in grads:
            g.grad = None
        if t is not None:
            out[label] = t
    return out


def _backend_call(layer, cands, label, call):
    backend, expand, fused = next(c[1:] for c in cands if c[0] == label)
    return _with_backend(layer, backend, expand, fused, call)


def _graph_ms(fn, repeat: int = 20) -> list[float]:
    from trimformer.bench.common import time_cuda_graph

    return time_cuda_graph(fn, warmup=2, repeat=repeat)


def _decode_point(args, rec, log, cfg, name, layer, b, ctx, impl):
    import torch

    from trimformer.bench.attention_kernel import _prime_clocks, _try
    from trimformer.bench.common import time_cuda_graph
    from trimformer.layers import AttentionCache

    cache = AttentionCache.allocate(cfg, b, ctx + 8, num_layers=1, dtype=torch.bfloat16, device=_DEV)
    entry = cache.layers[0]
    gen = torch.Generator(device=_DEV).manual_seed(args.seed + ctx + b)
    for t in entry._tensors():
        t.copy_(torch.randn(t.shape, device=_DEV, dtype=t.dtype, generator=gen))
    x = torch.randn(b, 1, E, device=_DEV, dtype=torch.bfloat16, generator=gen)
    layer.impl = impl

    def step():
        entry.reserved = 0  # host bound only; the graph replays the device work
        entry.seqlens.fill_(ctx - 1)
        with torch.no_grad():
            return layer(x, cache=cache)

    _prime_clocks()
    samples = _try(log, f"{name} decode {impl}", partial(time_cuda_graph, step, warmup=3, repeat=100))
    if samples is None:
        return None
    provider = "ours" if impl == "auto" and name in OURS else ("ours-kernels" if impl == "auto" else "pytorch")
    rec.add(f"{name}|d{cfg.head_dim}|B{b}|ctx{ctx}", provider, "decode (cuda graph)", "ms", samples, method=name,
            kind=cfg.kind, head_dim=cfg.head_dim, batch=b, context=ctx, dtype="bfloat16", impl=impl)  # fmt: skip
    return _median(samples)


def _breakdown(args, rec, log, cfg, name, b, s):
    """GPU time (CUDA graphs) of the CCA prologue (fused, and the PyTorch path) and of the attention core alone, on the
    layer's latent shapes; with ``--sweep`` also other launch configurations of the fused prologue."""
    import torch

    from trimformer.bench.attention_kernel import _prime_clocks, _try
    from trimformer.ops.attention import varlen_attention
    from trimformer.ops.cca import cca_prologue, prologue_bwd, prologue_folded, prologue_fwd, prologue_gemm
    from trimformer.ops.cca import core as cca_core
    from trimformer.ops.rope import rotary_cos_sin

    t, hq, hk, dh = b * s, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    gen = torch.Generator(device=_DEV).manual_seed(args.seed)
    r = lambda *shape, std=1.0: (std * torch.randn(*shape, device=_DEV, generator=gen)).to(torch.bfloat16)
    c = (hq + hk) * dh
    lat = [r(t, hq * dh), r(t, hk * dh), r(t, hk * dh // 2), r(t, hk * dh // 2)]
    w = [r(c, 2), r(c), r(c, dh, 2, std=dh**-0.5), r(c), torch.ones(hk, device=_DEV, dtype=torch.bfloat16)]
    pos = torch.arange(s, device=_DEV).repeat(b)
    cos, sin = rotary_cos_sin(pos, cfg.rotary_dim, cfg.rope_theta)
    cu = torch.arange(b + 1, device=_DEV, dtype=torch.int32) * s
    kw = dict(num_heads=hq, num_kv_heads=hk)
    cot = [r(t, hq, dh), r(t, hk, dh), r(t, hk, dh)]
    variants = {"prologue-triton": ("triton", None, None), "prologue-torch": ("torch", None, None),
                "prologue-triton[one-kernel fwd]": ("triton", prologue_fwd.default_fwd_config(dh), None),
                "prologue-triton[two-kernel fwd]": ("triton", prologue_gemm.default_gemm_config(dh), None),
                "prologue-triton[folded fwd]": ("triton", prologue_folded.default_folded_config(dh, t, hq // hk), None),
                "prologue-triton[folded fwd, weights pre-folded]": ("triton", "pre-folded", None)}  # fmt: skip
    if args.sweep and (name, dh, b) == ("CCA-4x", 128, 1):  # rows x warps x pipeline stages; the fp32 dY2 scratch
        for fc in SWEEP_FWD:
            variants[f"prologue-triton[fwd {fc[0]}x w{fc[1]} s{fc[2]}]"] = ("triton", prologue_fwd.FwdConfig(*fc), None)
        bc = dataclasses.replace(prologue_bwd.default_bwd_config(dh), scratch="fp32")
        variants["prologue-triton[bwd dY2 fp32]"] = ("triton", None, bc)
    meta = prologue_fwd.make_meta(lat[0], w[0], w[2], cos, qk_mean=True, value_shift=True, temperature_mode="linear",
                                  **kw)  # fmt: skip
    folded = prologue_folded.fold_conv_weights(*w[:4], torch.bfloat16)
    out = {}
    for label, (impl, fcfg, bcfg) in variants.items():
        for mode in ("fwd", "fwd+bwd"):
            if (fcfg is not None and mode != "fwd") or (bcfg is not None and mode != "fwd+bwd"):
                continue
            leaves = [x.requires_grad_(mode == "fwd+bwd") for x in (*lat, *w)]

            def call(impl=impl, mode=mode, fcfg=fcfg, bcfg=bcfg):
                if fcfg == "pre-folded":  # the folded kernel alone, weights folded once outside the timed region
                    q, k, v = lat[0].new_empty(t, hq, dh), lat[0].new_empty(t, hk, dh), lat[0].new_empty(t, hk, dh)
                    return prologue_folded.launch_folded_fwd(meta, *lat, *w, cos, sin, cu, s, None, None, q, k, v,
                                                             folded=folded)  # fmt: skip
                if fcfg is not None:
                    return prologue_fwd.cca_prologue_fwd(meta, *lat, *w, cos, sin, cu, s, None, None, False,
                                                         config=fcfg)  # fmt: skip
                if bcfg is not None:
                    q, k, v = prologue_bwd.cca_prologue_autograd(meta, *lat, *w, cos, sin, cu, s, None, None,
                                                                 bwd_config=bcfg)  # fmt: skip
                else:
                    q, k, v, _ = cca_prologue(*lat, *w, cos, sin, cu, s, **kw, impl=impl)
                if mode == "fwd+bwd":
                    torch.autograd.backward((q, k, v), cot)

            _prime_clocks()
            with torch.set_grad_enabled(mode == "fwd+bwd"):
                x = _try(log, f"{label} {mode}", partial(_graph_ms, call, 10))
            for z in leaves:
                z.requires_grad_(False)
                z.grad = None
            if x is not None:
                out[(label, mode)] = _median(x)
                rec.add(f"{name}|d{dh}|B{b}|S{s}", label, f"{mode} (cuda graph)", "ms", x, method=name, head_dim=dh,
                        batch=b, seqlen=s, part="prologue")  # fmt: skip
    q, k, v = r(t, hq, dh), r(t, hk, dh), r(t, hk, dh)
    dout = r(t, hq, dh)
    for mode in ("fwd", "fwd+bwd"):
        leaves = [x.requires_grad_(mode == "fwd+bwd") for x in (q, k, v)]

        def core(mode=mode):
            o = varlen_attention(q, k, v, cu, s, causal=True, scale=dh**-0.5, impl="triton")
            if mode == "fwd+bwd":
                o.backward(dout)

        _prime_clocks()
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            x = _try(log, f"attention core {mode}", partial(_graph_ms, core, 10))
        for z in leaves:
            z.requires_grad_(False)
            z.grad = None
        if x is not None:
            out[("attention-core", mode)] = _median(x)
            rec.add(f"{name}|d{dh}|B{b}|S{s}", "attention-core", f"{mode} (cuda graph)", "ms", x, method=name,
                    head_dim=dh, batch=b, seqlen=s, part="attention")  # fmt: skip
    for mode in ("fwd", "fwd+bwd"):  # the SDPA candidates of the layer's dense-core routing (same probe)
        times = _try(
            log,
            f"sdpa core {mode}",
            partial(
                cca_core.probe,
                b,
                s,
                hq,
                hk,
                dh,
                torch.bfloat16,
                _DEV,
                mode == "fwd+bwd",
                cca_core.sdpa_candidates(hq != hk),
                10,
            ),
        )
        if times:
            best = min(times, key=times.get)
            out[("attention-core-sdpa", mode)] = times[best]
            rec.add(f"{name}|d{dh}|B{b}|S{s}", "attention-core-sdpa", f"{mode} (cuda graph)", "ms", times[best],
                    method=name, head_dim=dh, batch=b, seqlen=s, part="attention", sdpa=best,
                    probe_ms={k: round(v, 4) for k, v in times.items()})  # fmt: skip
    _projection_breakdown(args, rec, log, cfg, name, b, s, out, w, cos, sin, cu)
    log(f"  breakdown {name} d={dh} B={b} S={s}: " + " ".join(f"{p}/{m}={v:.4f}" for (p, m), v in out.items()))


def _projection_breakdown(args, rec, log, cfg, name, b, s, out, conv, cos, sin, cu) -> None:
    """Forward GPU time of the layer's down-projections alone (cuBLAS: the q, k, v weights as one GEMM, and as the
    four ``nn.Linear`` calls) and of the fused projection + prologue kernel (``cca_project_prologue``): their
    difference is what the prologue costs once fused into the projection. ``conv``, ``cos``, ``sin``, ``cu``: the
    prologue inputs of :func:`_breakdown` (conv weights + temperature, RoPE tables, document offsets)."""
    import torch
    import torch.nn.functional as F

    from trimformer.bench.attention_kernel import _prime_clocks, _try
    from trimformer.ops.cca import cca_project_prologue, project_fwd
    from trimformer.ops.cca.prologue_fwd import make_meta
    from trimformer.ops.cca.prologue_gemm import conv2_k_major

    t, hq, hk, dh, e = b * s, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    gen = torch.Generator(device=_DEV).manual_seed(args.seed + 1)
    r = lambda *shape, std=1.0: (std * torch.randn(*shape, device=_DEV, generator=gen)).to(torch.bfloat16)
    cq, ck = hq * dh, hk * dh
    x = r(t, e)
    ws = [r(n, e, std=e**-0.5) for n in (cq, ck, ck // 2, ck // 2)]
    wcat = torch.cat(ws)
    w2b = conv2_k_major(conv[2])
    kw = dict(num_heads=hq, num_kv_heads=hk)
    calls = {
        "projection-cublas[one GEMM]": lambda: x @ wcat.T,
        "projection-cublas[4 linears]": lambda: [F.linear(x, w) for w in ws],
        "projection+prologue-fused": lambda: cca_project_prologue(x, *ws, *conv, cos, sin, cu, s, **kw,
                                                                  conv2_weight_k_major=w2b, impl="triton"),
    }  # fmt: skip
    if args.sweep and (name, dh, b) == ("CCA-4x", 128, 1):
        meta = make_meta(x.new_empty(()).expand(t, cq), conv[0], conv[2], cos, qk_mean=True, value_shift=True,
                         temperature_mode="linear", **kw)  # fmt: skip
        qkv = [x.new_empty(t, hq, dh), x.new_empty(t, hk, dh), x.new_empty(t, hk, dh)]
        for pc in SWEEP_PROJECT:
            calls[f"projection+prologue-fused[{pc[0]}x k{pc[1]} w{pc[2]} s{pc[3]}]"] = partial(
                project_fwd.launch_project_fwd, meta, x, *ws, None, None, None, None, conv[0], conv[1], w2b, conv[3],
                conv[4], cos, sin, cu, None, *qkv, config=project_fwd.ProjectConfig(*pc))  # fmt: skip
    for label, fn in calls.items():
        _prime_clocks()
        with torch.no_grad():
            ms = _try(log, f"{label} fwd", partial(_graph_ms, fn, 10))
        if ms is not None:
            out[(label, "fwd")] = _median(ms)
            rec.add(f"{name}|d{dh}|B{b}|S{s}", label, "fwd (cuda graph)", "ms", ms, method=name, head_dim=dh,
                    batch=b, seqlen=s, part="projection")  # fmt: skip


def run(args) -> int:
    import torch

    from trimformer.bench.attention_report import render
    from trimformer.bench.common import Recorder

    if args.render:
        rec = Recorder.for_suite("attention", args.out)
        print(render(rec.csv_path, args.render, rec.out_dir, args.render_appendix))
        return 0
    if not torch.cuda.is_available():
        raise ValueError("the attention suite needs a CUDA GPU")
    from trimformer.bench.attention_kernel import _try, _warm_gpu
    from trimformer.layers import build_attention

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(methods) - set(METHODS) or set(modes) - {"fwd", "fwd+bwd", "decode"}
    if bad:
        raise ValueError(f"unknown methods/modes {sorted(bad)}; methods: {', '.join(METHODS)}; modes: fwd, fwd+bwd, "
                         "decode")  # fmt: skip
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
    rec = Recorder.for_suite("attention", args.out)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(rec.env_line())
    _warm_gpu()
    torch.backends.cuda.matmul.allow_tf32 = False
    for dh in ints(args.head_dims):
        cfgs = method_configs(dh)
        for name in methods:
            cfg = cfgs[name]
            torch.manual_seed(args.seed)
            layer = build_attention(cfg, impl="auto", device=_DEV, dtype=torch.bfloat16)
            impls = ["auto"] + (["torch"] if args.cca_torch else []) if name in OURS else ["torch"]
            for b in ints(args.batch):
                for s in ints(args.seqlens):
                    if b * s > args.max_tokens:
                        continue
                    for mode in [m for m in modes if m != "decode"]:
                        for impl in impls:
                            res = _layer_point(args, rec, log, cfg, name, layer, b, s, mode, impl)
                            log(f"d={dh} {name:12s} B={b} S={s:6d} {mode:8s} " +
                                " ".join(f"{p}={t:.4f}" for p, t in res.items()))  # fmt: skip
                    if args.breakdown and name in OURS and s in ints(args.breakdown_seqlens):
                        _try(log, "breakdown", partial(_breakdown, args, rec, log, cfg, name, b, s))
                    torch.cuda.empty_cache()
                if "decode" in modes:
                    for ctx in ints(args.decode_contexts):
                        for impl in ("auto",) if name in OURS else ("auto", "torch"):
                            t = _decode_point(args, rec, log, cfg, name, layer, b, ctx, impl)
                            log(f"d={dh} {name:12s} B={b} ctx={ctx:6d} decode {impl}: {t}")
                rec.write_csv()
                rec.rows.clear()
            del layer
            torch.cuda.empty_cache()
    print(render(rec.csv_path, rec.run_id, rec.out_dir))
    return 0
