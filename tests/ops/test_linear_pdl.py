"""Programmatic dependent launch (PDL): the switch, the compiled ordering rule, and PDL == no PDL on a chain of the
encoder's real ops inside a captured CUDA graph (GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from trimformer.ops import triton_utils
from trimformer.testing.sm90 import compile_for_sm90, has_nvidia_backend

pytest.importorskip("triton")


def test_pdl_is_off_on_cpu_and_under_the_switch(monkeypatch):
    monkeypatch.setenv("TRIMFORMER_PDL", "1")
    assert not triton_utils.pdl_enabled(torch.device("cpu"))
    assert triton_utils.pdl_mode(torch.device("cpu")) == triton_utils.PDL_OFF
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        on = torch.cuda.get_device_capability()[0] >= 9 and not triton_utils.interpreting()
        assert triton_utils.pdl_enabled(dev) == on
        big = triton_utils.PDL_MAX_ROWS + 1
        for env, mode, mode_big in (("1", triton_utils.PDL_DEFAULT, 0), ("early", 2, 2), ("late", 1, 1), ("0", 0, 0)):
            monkeypatch.setenv("TRIMFORMER_PDL", env)
            assert triton_utils.pdl_mode(dev, 7) == (mode if on else 0)
            assert triton_utils.pdl_mode(dev, big) == (mode_big if on else 0)  # the default is for small batches


@pytest.mark.interpret
def test_interpreter_launches_keep_pdl_off():
    """Under TRITON_INTERPRET=1 the kernels run with their PDL branches compiled out (the interpreter has no grid
    dependency control); a GEMM + split-K + LayerNorm chain still matches plain PyTorch."""
    from trimformer.ops.linear import linear, linear_add_layer_norm

    assert not triton_utils.pdl_enabled(torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    x, w, w2 = (torch.randn(*s, generator=g) / 4 for s in ((19, 32), (48, 32), (32, 48)))
    b, lw = torch.randn(48, generator=g), torch.ones(32)
    f = linear(x, w, b, "gelu", impl="triton")
    out = linear_add_layer_norm(f, w2, None, x, lw, None, eps=1e-6, impl="triton")
    ref = torch.nn.functional.layer_norm(torch.nn.functional.gelu(x @ w.T + b) @ w2.T + x, (32,), lw, None, 1e-6)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


_SM90_PDL = r"""
from trimformer.ops.linear import gemm, splitk
from trimformer.ops.norm import layernorm
from trimformer.ops.attention import forward
tu.pdl_mode = lambda device, rows=0: MODE  # every op's pdl_launch asks it
for mod in (gemm, layernorm, forward):
    if hasattr(mod, "num_sms"):
        mod.num_sms = tu.num_sms
gemm.tma_reason = splitk.tma_reason = lambda *a: None
G, S = gemm.GemmConfig, splitk.SplitKConfig
x, w, b = torch.randn(350, 768).half(), torch.randn(2304, 768).half(), torch.randn(2304).half()
gemm.linear_fwd(x, w, b, "identity", config=G(64, 128, 64, 8, 4, 4, tma=True))
gemm.linear_fwd(x, w, b, "gelu_erf", config=G(64, 64, 64, 8, 4, 4))
splitk.linear_partials_fwd(x, w[:768], S(64, 128, 64, 8, 4, 4, 3, tma=True))
h = torch.randn(350, 768).half()
layernorm.add_layer_norm_fwd(h, h, b[:768], b[:768], 1e-12, b[:768])
qkv = x.view(350, 12, 64)
forward.varlen_attention_fwd(qkv, qkv, qkv, torch.tensor([0, 350], dtype=torch.int32), 512, causal=False, scale=0.1)
for name, k in kernels:
    seq = []
    for line in k.asm["ptx"].splitlines():
        for op in ("griddepcontrol.wait", "griddepcontrol.launch_dependents", "cp.async.bulk.prefetch.L2",
                   "cp.async.bulk.tensor", "cp.async", "wgmma.mma_async", "ld.global", "st.global"):
            if op in line:
                seq.append(op.split(".")[-1] if op.startswith("griddep") else op)
                break
    first_wait = seq.index("wait")
    early = seq[first_wait + 1] == "launch_dependents"  # the trigger right after the wait
    print(name, k.metadata.launch_pdl, seq.count("launch_dependents") == 1, early,
          "cp.async.bulk.prefetch.L2" in seq[:first_wait],
          ",".join(sorted(set(seq[:first_wait]) - {"cp.async.bulk.prefetch.L2", "wgmma.mma_async"})) or "-")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", [triton_utils.PDL_LATE, triton_utils.PDL_EARLY])
def test_pdl_kernels_wait_before_dynamic_reads_and_stores_sm90(mode):
    """Compiled for sm_90 (CPU, no GPU): every PDL kernel launches with the PDL attribute and triggers its dependents
    once, right after its wait in the early mode and later in the late one; before its first ``griddepcontrol.wait``
    a GEMM issues only the weight prefetch (no operand load, no store), the LayerNorm only its constant parameter
    loads, attention nothing."""
    if not has_nvidia_backend():
        pytest.skip("this Triton build has no NVIDIA backend (compiler and ptxas) to compile sm_90 kernels with")
    proc = compile_for_sm90(_SM90_PDL.replace("MODE", str(mode)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    e = str(mode == triton_utils.PDL_EARLY)
    assert lines == [
        ["_linear_tma_kernel", "True", "True", e, "True", "-"],
        ["_linear_kernel", "True", "True", e, "True", "-"],
        ["_linear_splitk_tma_kernel", "True", "True", e, "True", "-"],
        ["_add_ln_fwd_kernel", "True", "True", e, "False", "ld.global"],  # LayerNorm weight, bias, GEMM bias
        ["_varlen_fwd_kernel", "True", "True", e, "False", "-"],
    ], proc.stdout


# ------------------------------------------------------------------ GPU: PDL == no PDL inside a graph


def _layer_weights(h, inter, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"qkv": (3 * h, h), "out": (h, h), "ffn_in": (inter, h), "ffn_out": (h, inter)}
    w = {k: (torch.randn(*s, generator=g) / math.sqrt(s[1])) for k, s in shapes.items()}
    w.update({f"{k}_b": torch.randn(s[0], generator=g) * 0.1 for k, s in shapes.items()})
    w.update(ln_w=1 + 0.1 * torch.randn(h, generator=g), ln_b=0.1 * torch.randn(h, generator=g))
    return {k: v.to("cuda", torch.float16) for k, v in w.items()}


def _chain(x, cu, max_seqlen, layers, big):
    """Two encoder layers through explicit Triton paths: TMA / pointer / persistent GEMMs, split-K + LayerNorm
    partials, attention, bias + GELU, add + LayerNorm in place (every PDL kernel of the forward)."""
    from trimformer.ops.activation import bias_act
    from trimformer.ops.attention import varlen_attention
    from trimformer.ops.linear import linear_add_layer_norm
    from trimformer.ops.linear.gemm import GemmConfig as G
    from trimformer.ops.linear.gemm import linear_fwd
    from trimformer.ops.linear.splitk import SplitKConfig as S
    from trimformer.ops.norm import add_layer_norm

    t, h = x.shape
    for w in layers:
        qkv_cfg = G(64, 128, 64, 8, 4, 4, tma=True)
        if big:
            qkv_cfg = G(128, 128, 64, 8, 4, 3, True, tma=True, split=2, ctas_per_sm=2)
        qkv = linear_fwd(x, w["qkv"], w["qkv_b"], "identity", config=qkv_cfg).view(t, 3, 12, h // 12)
        a = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_seqlen, impl="triton").reshape(t, h)
        x = linear_add_layer_norm(a, w["out"], w["out_b"], x, w["ln_w"], w["ln_b"], eps=1e-12, impl="triton",
                                  config=S(64, 128, 64, 8, 4, 4, 3, tma=True))  # fmt: skip
        f = linear_fwd(x, w["ffn_in"], None, "identity", config=G(64, 64, 64, 8, 4, 4))
        f = bias_act(f, w["ffn_in_b"], "gelu", inplace=True, impl="triton")
        f2 = linear_fwd(f, w["ffn_out"], None, "identity", config=G(128, 128, 64, 8, 8, 4, True, tma=True))
        x = add_layer_norm(f2, x, w["ln_w"], w["ln_b"], eps=1e-12, x_bias=w["ffn_out_b"], inplace=True, impl="triton")
        x = linear_fwd(x, w["out"], w["out_b"], "gelu_erf", config=G(64, 128, 64, 8, 4, 4, tma=True))
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["late", "early"])
@pytest.mark.parametrize("tokens", [300, 3000])
def test_pdl_chain_in_graph_equals_plain_launches(monkeypatch, tokens, mode):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs an sm_90+ GPU (this one is older)")
    h, inter = 768, 3072
    layers = [_layer_weights(h, inter, seed) for seed in (1, 2)]
    lens = [tokens // 3, tokens // 2, tokens - tokens // 3 - tokens // 2]
    cu = torch.tensor([0, lens[0], lens[0] + lens[1], tokens], dtype=torch.int32, device="cuda")
    inputs = [torch.randn(tokens, h, generator=torch.Generator().manual_seed(10 + i)).half().cuda() for i in range(3)]
    big = tokens > 512
    monkeypatch.setenv("TRIMFORMER_PDL", "0")
    with torch.inference_mode():
        ref = [_chain(x, cu, max(lens), layers, big).float() for x in inputs]
    monkeypatch.setenv("TRIMFORMER_PDL", mode)
    assert triton_utils.pdl_mode(torch.device("cuda")) == {"late": 1, "early": 2}[mode]
    with torch.inference_mode():
        eager = _chain(inputs[0], cu, max(lens), layers, big).float()
        static = inputs[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _chain(static, cu, max(lens), layers, big)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(static, cu, max(lens), layers, big)
        for x, r in zip(inputs, ref):
            static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(out).all()
            # same kernels, same configs: a race (a read before the producer finished, a store over a buffer still
            # being read) shows as O(1) errors; only the compiler's instruction order may differ (fp16 ulps)
            torch.testing.assert_close(out.float(), r, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(eager, ref[0], rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_tuner_weight_copies_span_twice_the_l2():
    from trimformer.ops.linear import tune

    w = torch.randn(768, 768, device="cuda", dtype=torch.float16)
    copies = tune.weight_copies(w)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    assert copies[0] is w and all(torch.equal(c, w) for c in copies)
    assert len({c.data_ptr() for c in copies}) == len(copies)
    assert len(copies) * w.numel() * 2 >= min(2 * l2, 128 * w.numel() * 2)
