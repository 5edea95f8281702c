"""CCAttention on the Triton kernels (fused prologue + flash attention + flash decoding) against the fp64 layer.

``interpret``: fp32 on CPU under ``TRITON_INTERPRET=1``: packed ragged documents forward and every parameter's
gradient; cached chunked prefill and decode steps equal one forward. ``gpu``: bf16 at a real shape (E = 2048,
CCA-4x and CCGQA-2x/8x): output within 2x of the PyTorch path's bf16 error, gradient cosine >= 0.999 for every
parameter and for the input, and decode through the cache.
"""

from __future__ import annotations

import pytest
import torch

from trimformer.layers import AttentionCache, AttentionConfig, CCAttention
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
