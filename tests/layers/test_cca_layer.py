"""CCAttention: parameter formula, gradients, causality, packing/padding, reductions to known cases, switches."""

import json
import math

import pytest
import torch
from torch.func import functional_call

from trimformer.layers import AttentionConfig, CCAttention
from trimformer.ops.attention import naive_attention
from trimformer.ops.rope import apply_rotary, rotary_cos_sin

F64 = torch.float64


def tiny(kind="ccgqa", **kw):
    base = dict(
        kind=kind,
        hidden_size=24,
        num_heads=4,
        num_kv_heads=2 if kind == "ccgqa" else 4,
        head_dim=6,
        rope_fraction=2 / 3,
        bias=True,
        conv_kernel_seq=2,
        conv_kernel_ch=3,
    )
    return AttentionConfig(**{**base, **kw})


def randomized(config, dtype=F64, seed=0):
    torch.manual_seed(seed)
    layer = CCAttention(config).to(dtype)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0, 0.3 if "proj" in name else 0.5)
    return layer


@pytest.mark.parametrize("hq,hk,dh,k1,k2", [(8, 2, 128, 2, 2), (4, 4, 128, 3, 2), (16, 4, 64, 2, 4)])
def test_parameter_formula(hq, hk, dh, k1, k2):
    """Spec test 1: projections 2E^2/C1 + 2E^2/C2, convs (Cq+Ck)(k_seq+1) + (Cq+Ck)(d_h k_ch+1), h_k temperatures."""
    e = 2048
    cfg = AttentionConfig(
        kind="cca" if hq == hk else "ccgqa",
        hidden_size=e,
        num_heads=hq,
        num_kv_heads=hk,
        head_dim=dh,
        conv_kernel_seq=k1,
        conv_kernel_ch=k2,
    )
    layer = CCAttention(cfg, device="meta")
    c1, c2 = e / (hq * dh), e / (hk * dh)
    c = hq * dh + hk * dh
    expected = 2 * e * e / c1 + 2 * e * e / c2 + c * (k1 + 1) + c * (dh * k2 + 1) + hk
    assert sum(p.numel() for p in layer.parameters()) == expected
    if (hq, hk, dh, k1, k2) == (8, 2, 128, 2, 2):
        assert expected == 5_575_682  # ZAYA1
    assert layer.conv2_weight.shape == (c, dh, k2) and layer.temperature.shape == (hk,)


@pytest.mark.parametrize("mode", ["linear", "exp"])
def test_gradcheck_every_parameter(mode):
    """Spec test 9: fp64 gradcheck of the whole layer over every parameter (convs, biases, temperature) and input."""
    cfg = AttentionConfig(
        kind="ccgqa",
        hidden_size=8,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        bias=True,
        conv_kernel_ch=2,
        rope_fraction=0.5,
        temperature_mode=mode,
    )
    layer = randomized(cfg)
    names = [n for n, _ in layer.named_parameters()]
    assert {"conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "temperature"} <= set(names)
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    x = torch.randn(5, 8, dtype=F64, requires_grad=True)
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,), {"cu_seqlens": cu, "max_seqlen": 3})

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("kind", ["cca", "ccgqa"])
def test_causality_bit_exact(kind):
    layer = randomized(tiny(kind))
    x = torch.randn(2, 10, 24, dtype=F64)
    y = layer(x)
    for t in (1, 4, 9):
        x2 = x.clone()
        x2[:, t:] += torch.randn(2, 10 - t, 24, dtype=F64)
        y2 = layer(x2)
        assert torch.equal(y[:, :t], y2[:, :t])
        assert (y[:, t] - y2[:, t]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["cca", "ccgqa"])
def test_packed_documents_equal_separate_runs(kind):
    layer = randomized(tiny(kind))
    lens = [6, 1, 9, 3]
    x = torch.randn(sum(lens), 24, dtype=F64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    y = layer(x, cu_seqlens=cu, max_seqlen=9)
    for i in range(len(lens)):
        s, e = cu[i].item(), cu[i + 1].item()
        torch.testing.assert_close(y[s:e], layer(x[None, s:e])[0], rtol=0, atol=1e-12)
    # nothing leaks: changing one document leaves the others bit-identical
    x2 = x.clone()
    x2[6:7] += 1.0
    y2 = layer(x2, cu_seqlens=cu, max_seqlen=9)
    assert torch.equal(y2[:6], y[:6]) and torch.equal(y2[7:], y[7:])


def test_left_padded_batch_equals_separate_runs():
    layer = randomized(tiny())
    lens = [8, 3, 5]
    mask = torch.zeros(3, 8, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, 8 - n :] = True
    x = torch.randn(3, 8, 24, dtype=F64)
    y = layer(x, attention_mask=mask)
    for b, n in enumerate(lens):
        torch.testing.assert_close(y[b, 8 - n :], layer(x[b : b + 1, 8 - n :])[0], rtol=0, atol=1e-12)
    assert torch.equal(y[~mask], torch.zeros(int((~mask).sum()), 24, dtype=F64))


def _qk_normed_gqa(layer, x):
    """Reference for spec test 10: QK-normed GQA on the latent projections, written from scratch."""
    c = layer.config
    s, hq, hk, dh = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
    q = layer.q_proj(x).view(s, hq, dh)
    k = layer.k_proj(x).view(s, hk, dh)
    v = torch.cat([layer.v_proj_current(x), layer.v_proj_delayed(x)], -1).view(s, hk, dh)
    q = math.sqrt(dh) * q / q.norm(dim=-1, keepdim=True)
    k = math.sqrt(dh) * layer.temperature[:, None] * k / k.norm(dim=-1, keepdim=True)
    cos, sin = rotary_cos_sin(torch.arange(s), c.rotary_dim, c.rope_theta, dtype=F64)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = naive_attention(q, k, v, causal=True, scale=dh**-0.5)
    return layer.o_proj(o.reshape(s, hq * dh))


@pytest.mark.parametrize("hq,hk,dh", [(4, 2, 8), (3, 3, 8)])
def test_reduction_to_qk_normed_gqa_and_mha(hq, hk, dh):
    """Spec test 10: delta convs (the initialisation), zero conv biases, qk-mean and value shift off reduce CCGQA to
    QK-normed GQA on the latents; with g = 1 and C = 1 (h_q d_h = E) it is QK-normed MHA."""
    e = 24
    cfg = AttentionConfig(
        kind="cca" if hq == hk else "ccgqa",
        hidden_size=e,
        num_heads=hq,
        num_kv_heads=hk,
        head_dim=dh,
        qk_mean=False,
        value_shift=False,
        conv_kernel_ch=3,
        rope_fraction=0.5,
    )
    layer = CCAttention(cfg).double()  # reset_parameters: delta convs, zero biases, beta = 1
    with torch.no_grad():
        for lin in (layer.q_proj, layer.k_proj, layer.v_proj_current, layer.v_proj_delayed, layer.o_proj):
            lin.weight.normal_(0, 0.3)
        layer.temperature.copy_(torch.rand(hk, dtype=F64) + 0.5)
    x = torch.randn(7, e, dtype=F64)
    torch.testing.assert_close(layer(x), _qk_normed_gqa(layer, x), rtol=0, atol=1e-12)
    if hq == hk:
        assert hq * dh == e  # C = 1: the latent is as wide as MHA


def test_switches_change_the_function():
    x = torch.randn(9, 24, dtype=F64)
    ref = randomized(tiny())(x)
    for change in ({"qk_mean": False}, {"value_shift": False}, {"temperature_mode": "exp"}, {"num_convs": 1}):
        layer = randomized(tiny(**change))
        assert not torch.allclose(layer(x), ref), change
    assert randomized(tiny(num_convs=0)).conv1_weight is None
    one = randomized(tiny(num_convs=1))
    assert one.conv1_weight is not None and one.conv2_weight is None and one.config.conv_padding == 1


def test_initialisation():
    for mode, t0 in (("linear", 1.0), ("exp", 0.0)):
        layer = CCAttention(tiny(temperature_mode=mode))
        assert torch.equal(layer.temperature, torch.full((2,), t0))
    layer = CCAttention(tiny())
    assert torch.equal(layer.conv1_weight[:, -1], torch.ones(36)) and not layer.conv1_weight[:, :-1].any()
    w2 = layer.conv2_weight
    assert torch.equal(w2[:, :, -1], torch.eye(6).repeat(6, 1)) and not w2[..., :-1].any()
    assert not layer.conv1_bias.any() and not layer.q_proj.bias.any()
    assert 0.01 < layer.q_proj.weight.std().item() < 0.03


def test_impls_and_config_serialisation():
    cfg = tiny()
    layer = randomized(cfg)
    x = torch.randn(2, 5, 24, dtype=F64)
    naive = CCAttention(cfg, impl="naive").double()
    naive.load_state_dict(layer.state_dict())
    torch.testing.assert_close(naive(x), layer(x), rtol=0, atol=1e-12)
    triton = CCAttention(cfg, impl="triton").double()
    with pytest.raises(ValueError, match="impl='triton' cannot run this CCA prologue: dtype torch.float64"):
        triton(x)  # an explicit "triton" never falls back
    assert AttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_bad_inputs_raise():
    layer = randomized(tiny())
    x = torch.randn(2, 5, 24, dtype=F64)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 23, dtype=F64))
    with pytest.raises(ValueError, match="attention_mask must be"):
        layer(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="cu_seqlens is for packed"):
        layer(x, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D int32"):
        layer(x[0], cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="impl must be one of"):
        CCAttention(tiny(), impl="cuda")
    with pytest.raises(ValueError, match="CCAttention needs kind"):
        CCAttention(AttentionConfig(kind="gqa", hidden_size=24, num_heads=4, num_kv_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="cca needs num_kv_heads == num_heads"):
        tiny(kind="cca", num_kv_heads=2)
    with pytest.raises(ValueError, match="rope_fraction"):
        tiny(rope_fraction=0.5)  # 3 rotated dims: odd
    with pytest.raises(ValueError, match="num_convs"):
        tiny(num_convs=3)
    with pytest.raises(ValueError, match="unknown AttentionConfig fields"):
        AttentionConfig.from_dict({"kind": "cca", "heads": 4})
