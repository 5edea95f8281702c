"""CCAttention on the Triton kernels (fused prologue + flash attention + flash decoding) against the fp64 layer.

``interpret``: fp32 on CPU under ``TRITON_INTERPRET=1``: packed ragged documents forward and every parameter's
gradient; cached chunked prefill and decode steps equal one forward; ``impl="triton"`` never routes the core.
CPU: the dense-input core routing (decision mocked to an SDPA choice) gives the output and gradients of the packed
path. ``gpu``: bf16 at a real shape (E = 2048, CCA-4x and CCGQA-2x/8x): output within 2x of the PyTorch path's bf16
error, gradient cosine >= 0.999 for every parameter and for the input, decode through the cache, and
``impl="auto"`` on dense input picks a core (cached per shape) whose result, like every other candidate's, matches
the fp64 layer.
"""

from __future__ import annotations

import pytest
import torch

import trimformer.layers.cca as cca_layer
from trimformer.layers import AttentionCache, AttentionConfig, CCAttention
from trimformer.ops.cca import core
from trimformer.testing import assert_close_budget

pytest.importorskip("triton")

F64 = torch.float64


def make_layer(config, impl, dtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    layer = CCAttention(config, impl="naive", device=device, dtype=F64)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, 0.3 if "proj" in name else 0.5)
    out = CCAttention(config, impl=impl, device=device, dtype=dtype)
    out.load_state_dict(layer.state_dict())
    return layer, out


TINY = AttentionConfig(kind="ccgqa", hidden_size=24, num_heads=4, num_kv_heads=2, head_dim=8, conv_kernel_seq=3,
                       conv_kernel_ch=2, bias=True, temperature_mode="exp")  # fmt: skip


@pytest.mark.interpret
def test_packed_forward_and_gradients_fp32():
    ref, tri = make_layer(TINY, "triton", torch.float32)
    lens = [13, 1, 20]
    cu = torch.tensor([0, 13, 14, 34], dtype=torch.int32)
    x = torch.randn(sum(lens), 24, dtype=F64)
    dy = torch.randn(sum(lens), 24, dtype=F64)
    xr = x.clone().requires_grad_()
    xt = x.float().requires_grad_()
    yr = ref(xr, cu_seqlens=cu, max_seqlen=20)
    yt = tri(xt, cu_seqlens=cu, max_seqlen=20)
    torch.testing.assert_close(yt.double(), yr, rtol=0, atol=2e-5)
    (yr * dy).sum().backward()
    (yt * dy.float()).sum().backward()
    torch.testing.assert_close(xt.grad.double(), xr.grad, rtol=0, atol=2e-5)
    grads = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        want = grads[name].grad
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(p.grad.double(), want, rtol=0, atol=3e-5 * scale, msg=name)


@pytest.mark.interpret
def test_cached_prefill_and_decode_equal_one_forward_fp32():
    ref, tri = make_layer(TINY, "triton", torch.float32, seed=1)
    b, s = 3, 9
    x = torch.randn(b, s, 24, dtype=F64)
    with torch.no_grad():
        full = ref(x)
        cache = AttentionCache.allocate(TINY, b, s, num_layers=1, dtype=torch.float32)
        outs = [tri(x[:, :4].float(), cache=cache), tri(x[:, 4:6].float(), cache=cache)]
        for t in range(6, s):  # decode path: dense [B, 1, E] without a mask
            outs.append(tri(x[:, t : t + 1].float(), cache=cache))
    torch.testing.assert_close(torch.cat(outs, dim=1).double(), full, rtol=0, atol=2e-5)


@pytest.mark.parametrize("expand", [False, True], ids=["enable_gqa", "expand"])
def test_dense_core_routing_matches_packed(monkeypatch, expand):
    """Dense input whose core is routed to SDPA (decision mocked: the math backend on CPU) equals the same tokens as
    packed documents (our varlen path), output and every gradient; the decision sees the training flag."""
    from torch.nn.attention import SDPBackend

    _, layer = make_layer(TINY, "auto", torch.float32, seed=2)
    calls = []

    def pick(q, k, dense, train):
        calls.append((tuple(q.shape), tuple(k.shape), dense, train))
        return core.CoreChoice("sdpa-math-test", SDPBackend.MATH, expand)

    monkeypatch.setattr(cca_layer, "pick_dense_core", pick)
    b, s = 3, 11
    x = torch.randn(b, s, 24)
    dy = torch.randn(b, s, 24)
    xd = x.clone().requires_grad_()
    yd = layer(xd)
    assert layer.core_backend == "sdpa-math-test"
    (yd * dy).sum().backward()
    gd = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    assert calls == [((b * s, 4, 8), (b * s, 2, 8), (b, s), True)]
    cu = torch.arange(b + 1, dtype=torch.int32) * s
    xp = x.reshape(b * s, 24).clone().requires_grad_()
    yp = layer(xp, cu_seqlens=cu, max_seqlen=s)
    assert layer.core_backend == "torch" and len(calls) == 1  # packed input is never routed
    (yp * dy.reshape(b * s, 24)).sum().backward()
    tol = lambda g: 2e-5 * max(1.0, g.abs().max().item())  # fp32 rounding of two summation orders
    torch.testing.assert_close(yd.reshape(b * s, 24), yp, rtol=0, atol=tol(yp))
    torch.testing.assert_close(xd.grad.reshape(b * s, 24), xp.grad, rtol=0, atol=tol(xp.grad))
    for n, p in layer.named_parameters():
        torch.testing.assert_close(gd[n], p.grad, rtol=0, atol=tol(p.grad), msg=n)
    with torch.no_grad():
        layer(x)
    assert calls[-1][3] is False  # inference: the forward-only choice


@pytest.mark.interpret
def test_triton_impl_never_routes_the_core(monkeypatch):
    def pick(*args):
        raise AssertionError("impl='triton' must not consult the core routing")

    monkeypatch.setattr(cca_layer, "pick_dense_core", pick)
    ref, tri = make_layer(TINY, "triton", torch.float32, seed=3)
    x = torch.randn(2, 9, 24, dtype=F64)
    with torch.no_grad():
        y = tri(x.float())
        want = ref(x)
    assert tri.core_backend == "triton"
    torch.testing.assert_close(y.double(), want, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------------------------------- GPU


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)], ids=["cca4x", "ccgqa2x8x"])
def test_gpu_bf16_layer_forward_backward(hq, hk):
    cfg = AttentionConfig(kind="cca" if hq == hk else "ccgqa", hidden_size=2048, num_heads=hq, num_kv_heads=hk,
                          head_dim=128)  # fmt: skip
    ref, tri = make_layer(cfg, "triton", torch.bfloat16, device="cuda")
    ref.impl = "torch"  # fp64 on CUDA: PyTorch prologue + SDPA (math)
    base = CCAttention(cfg, impl="torch", device="cuda", dtype=torch.bfloat16)
    base.load_state_dict(ref.state_dict())
    with torch.no_grad():  # realistic weights: projection std 0.02 so that activations are O(1)
        for layer in (ref, tri, base):
            for name, p in layer.named_parameters():
                if "proj" in name:
                    p.mul_(0.02 / 0.3)
    x = torch.randn(2, 2048, 2048, device="cuda", dtype=F64)
    dy = torch.randn_like(x)
    outs, grads = {}, {}
    for key, layer, dtype in (("ref", ref, F64), ("tri", tri, torch.bfloat16), ("base", base, torch.bfloat16)):
        xi = x.detach().to(dtype).requires_grad_()
        y = layer(xi)
        (y * dy.to(dtype)).sum().backward()
        outs[key] = y.detach()
        grads[key] = {"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert_close_budget(outs["tri"], outs["ref"], outs["base"], name="layer output")
    for name, want in grads["ref"].items():
        c = _cosine(grads["tri"][name], want)
        assert c >= 0.999, f"{name}: gradient cosine {c:.5f} (PyTorch bf16 {_cosine(grads['base'][name], want):.5f})"


@pytest.mark.gpu
def test_gpu_bf16_decode_through_cache():
    cfg = AttentionConfig(kind="ccgqa", hidden_size=2048, num_heads=8, num_kv_heads=2, head_dim=128)
    _, tri = make_layer(cfg, "auto", torch.bfloat16, device="cuda")
    with torch.no_grad():
        for name, p in tri.named_parameters():
            if "proj" in name:
                p.mul_(0.02 / 0.3)
        x = torch.randn(4, 520, 2048, device="cuda", dtype=torch.bfloat16)
        full = tri(x).float()
        cache = AttentionCache.allocate(cfg, 4, 520, num_layers=1, dtype=torch.bfloat16, device="cuda")
        outs = [tri(x[:, :512], cache=cache)]
        for t in range(512, 520):
            outs.append(tri(x[:, t : t + 1], cache=cache))
    got = torch.cat(outs, dim=1).float()
    err = (got - full).abs().max().item()
    assert err <= 2e-2 * max(1.0, full.abs().max().item()), err


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)], ids=["cca4x", "ccgqa2x8x"])
def test_gpu_auto_routes_dense_core_and_matches_reference(hq, hk):
    """``impl="auto"`` on dense input measures the cores once per shape, caches the fastest and records it; the
    chosen core and every other runnable candidate (forced through the cache) match the fp64 layer within 2x of the
    PyTorch bf16 error, forward and gradients (cosine >= 0.999)."""
    cfg = AttentionConfig(kind="cca" if hq == hk else "ccgqa", hidden_size=2048, num_heads=hq, num_kv_heads=hk,
                          head_dim=128)  # fmt: skip
    ref, auto = make_layer(cfg, "auto", torch.bfloat16, device="cuda", seed=4)
    ref.impl = "torch"
    base = CCAttention(cfg, impl="torch", device="cuda", dtype=torch.bfloat16)
    base.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for layer in (ref, auto, base):
            for name, p in layer.named_parameters():
                if "proj" in name:
                    p.mul_(0.02 / 0.3)
    b, s = 2, 1024
    x = torch.randn(b, s, 2048, device="cuda", dtype=F64)
    dy = torch.randn_like(x)
    core.clear_core_cache()
    with torch.no_grad():
        want = ref(x)
        got = auto(x.to(torch.bfloat16))
        plain = base(x.to(torch.bfloat16))
    key = (torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, b, s, hq, hk, 128, False)
    chosen = core.cached_choices()
    assert list(chosen) == [key], chosen
    assert auto.core_backend == chosen[key].name
    assert_close_budget(got, want, plain, name=f"auto ({auto.core_backend})")
    xr = x.clone().requires_grad_()
    (ref(xr) * dy).sum().backward()
    want_g = {"x": xr.grad, **{n: p.grad for n, p in ref.named_parameters()}}
    cands = [core.TRITON, *core.sdpa_candidates(hq != hk)]
    runnable = core.probe(b, s, hq, hk, 128, torch.bfloat16, "cuda", True, cands, repeats=1)
    assert "triton" in runnable and any(n.startswith("sdpa-") for n in runnable), runnable
    for choice in [c for c in cands if c.name in runnable]:
        core._CACHE[key] = choice
        core._CACHE[key[:-1] + (True,)] = choice
        auto.zero_grad()
        xi = x.to(torch.bfloat16).requires_grad_()
        y = auto(xi)
        assert auto.core_backend == choice.name
        assert_close_budget(y.detach(), want, plain, name=choice.name)
        (y * dy.to(torch.bfloat16)).sum().backward()
        got_g = {"x": xi.grad, **{n: p.grad for n, p in auto.named_parameters()}}
        for n, g in want_g.items():
            c = _cosine(got_g[n], g)
            assert c >= 0.999, f"{choice.name} {n}: gradient cosine {c:.5f}"
    core.clear_core_cache()
