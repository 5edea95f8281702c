"""CCA prologue ops: the reference against the specification (cca-spec.md 1.10 and acceptance tests 5-9), and the
vectorised PyTorch path and the decode prologue against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from trimformer.ops.cca import cca_decode_prologue, cca_prologue, naive_cca_prologue
from trimformer.ops.rope import naive_apply_rotary, rotary_cos_sin
from trimformer.testing import assert_close_budget

F64 = torch.float64


def make_inputs(hq=4, hk=2, dh=8, lens=(5, 3), k1=2, k2=2, num_convs=2, rotary_dim=4, dtype=F64, conv_bias=True):
    """Random op inputs with O(1) conv weights (strong convs) and a packed batch with documents ``lens``."""
    cq, ck = hq * dh, hk * dh
    c = cq + ck
    t = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens]) if t else torch.zeros(0, dtype=torch.long)
    cos, sin = rotary_cos_sin(pos, rotary_dim, 100.0, dtype=torch.float64) if rotary_dim else (None, None)
    r = lambda *s: torch.randn(*s, dtype=dtype)
    w1 = r(c, k1) if num_convs >= 1 else None
    w2 = r(c, dh, k2) / math.sqrt(dh * k2) if num_convs == 2 else None
    b1 = r(c) if (num_convs >= 1 and conv_bias) else None
    b2 = r(c) if (num_convs == 2 and conv_bias) else None
    temp = torch.rand(hk, dtype=dtype) + 0.5
    return dict(
        q0=r(t, cq),
        k0=r(t, ck),
        v_cur=r(t, ck // 2),
        v_del=r(t, ck // 2),
        conv1_weight=w1,
        conv1_bias=b1,
        conv2_weight=w2,
        conv2_bias=b2,
        temperature=temp,
        cos=cos,
        sin=sin,
        cu_seqlens=cu,
        max_seqlen=max(lens),
    )


def spec_reference(inp, hq, hk, temperature_mode="linear"):
    """cca-spec.md 1.10 pseudo-code for ONE dense sequence (no state), transcribed as written."""
    q0, k0 = inp["q0"], inp["k0"]
    s = q0.shape[0]
    cq = q0.shape[1]
    dh = cq // hq
    g = hq // hk
    w1, w2 = inp["conv1_weight"], inp["conv2_weight"]
    pad = (w1.shape[1] - 1) + (w2.shape[2] - 1)
    qk0 = torch.cat([q0, k0], -1).t()[None]  # [1, C, S]
    qk = F.conv1d(F.pad(qk0, (pad, 0)), w1[:, None, :], inp["conv1_bias"], groups=qk0.shape[1])
    qk = F.conv1d(qk, w2, inp["conv2_bias"], groups=hq + hk)
    qc, kc = qk[0].t().split([cq, k0.shape[1]], -1)
    q0h, k0h = q0.view(s, hq, dh), k0.view(s, hk, dh)
    mq = 0.5 * (q0h + k0h.repeat_interleave(g, dim=1))
    mk = mq.view(s, hk, g, dh).mean(2)
    q, k = qc.reshape(s, hq, dh) + mq, kc.reshape(s, hk, dh) + mk
    v_prev = F.pad(inp["v_del"], (0, 0, 1, 0))[:-1]
    v = torch.cat([inp["v_cur"], v_prev], -1).view(s, hk, dh)
    temp = inp["temperature"]
    beta = temp.exp() if temperature_mode == "exp" else temp
    q = dh**0.5 * q / q.norm(dim=-1, keepdim=True)
    k = dh**0.5 * beta[:, None] * k / k.norm(dim=-1, keepdim=True)
    q, k = naive_apply_rotary(q, inp["cos"], inp["sin"]), naive_apply_rotary(k, inp["cos"], inp["sin"])
    return q, k, v


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (3, 1)])
@pytest.mark.parametrize("mode", ["linear", "exp"])
def test_reference_matches_spec_pseudocode(hq, hk, mode):
    inp = make_inputs(hq=hq, hk=hk, lens=(9,), k1=3, k2=2)
    q, k, v, _ = naive_cca_prologue(**inp, num_heads=hq, num_kv_heads=hk, temperature_mode=mode)
    rq, rk, rv = spec_reference(inp, hq, hk, mode)
    torch.testing.assert_close(q, rq, rtol=0, atol=1e-12)
    torch.testing.assert_close(k, rk, rtol=0, atol=1e-12)
    torch.testing.assert_close(v, rv, rtol=0, atol=0)


def test_shared_left_pad_not_per_conv_pad():
    """Spec test 5: one pad of P rows before both convs; padding each conv separately differs at t < k_ch - 1."""
    inp = make_inputs(hq=2, hk=2, lens=(6,), k1=2, k2=3)
    q, _, _, _ = naive_cca_prologue(**inp, num_heads=2, num_kv_heads=2)
    rq, _, _ = spec_reference(inp, 2, 2)
    torch.testing.assert_close(q[0], rq[0], rtol=0, atol=1e-12)
    qk0 = torch.cat([inp["q0"], inp["k0"]], -1).t()[None]
    c = qk0.shape[1]
    y = F.conv1d(F.pad(qk0, (1, 0)), inp["conv1_weight"][:, None], inp["conv1_bias"], groups=c)
    y = F.conv1d(F.pad(y, (2, 0)), inp["conv2_weight"], inp["conv2_bias"], groups=4)[0].t()
    per_conv = y[:, :16].reshape(6, 2, 8) + 0.5 * (inp["q0"] + inp["k0"]).reshape(6, 2, 8)
    per_conv = naive_apply_rotary(8**0.5 * per_conv / per_conv.norm(dim=-1, keepdim=True), inp["cos"], inp["sin"])
    assert (per_conv[:2] - q[:2]).abs().max() > 1e-3  # the wrong padding is detectably different ...
    torch.testing.assert_close(per_conv[2:], q[2:], rtol=0, atol=1e-12)  # ... only at the first k_ch - 1 rows


def test_value_shift_semantics():
    """Spec test 6: kv heads [0, h_k/2) read x_t, heads [h_k/2, h_k) read x_{t-1}; the delayed half at t=0 is the
    initial value (the bias of the delayed projection: here any given start value, or 0)."""
    hq, hk, dh = 4, 4, 4
    inp = make_inputs(hq=hq, hk=hk, dh=dh, lens=(5,))
    _, _, v, _ = naive_cca_prologue(**inp, num_heads=hq, num_kv_heads=hk)
    torch.testing.assert_close(v[:, :2].reshape(5, -1), inp["v_cur"], rtol=0, atol=0)
    torch.testing.assert_close(v[1:, 2:].reshape(4, -1), inp["v_del"][:-1], rtol=0, atol=0)
    assert torch.equal(v[0, 2:], torch.zeros(2, dh, dtype=F64))
    start = torch.randn(1, 8, dtype=F64)
    _, _, v, _ = naive_cca_prologue(**inp, num_heads=hq, num_kv_heads=hk, initial_value_state=start)
    torch.testing.assert_close(v[0, 2:].reshape(-1), start[0], rtol=0, atol=0)
    _, _, v_off, _ = naive_cca_prologue(**inp, num_heads=hq, num_kv_heads=hk, value_shift=False)
    torch.testing.assert_close(v_off[:, 2:].reshape(5, -1), inp["v_del"], rtol=0, atol=0)


@pytest.mark.parametrize("hq,hk", [(4, 4), (6, 2)])
def test_qk_mean_semantics(hq, hk):
    """Spec test 7: with the conv output forced to 0, q and k before the norm are the qk-mean terms."""
    dh, g = 8, hq // hk
    inp = make_inputs(hq=hq, hk=hk, dh=dh, lens=(4,), rotary_dim=0)
    inp["conv1_weight"].zero_()
    inp["conv1_bias"].zero_()
    inp["conv2_bias"].zero_()
    inp["temperature"].fill_(1.0)
    q, k, _, _ = naive_cca_prologue(**inp, num_heads=hq, num_kv_heads=hk)
    mq = 0.5 * (inp["q0"].view(4, hq, dh) + inp["k0"].view(4, hk, dh).repeat_interleave(g, 1))
    mk = torch.stack([mq[:, j * g : (j + 1) * g].mean(1) for j in range(hk)], 1)  # contiguous groups
    unit = lambda t: dh**0.5 * t / t.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(q, unit(mq), rtol=0, atol=1e-12)
    torch.testing.assert_close(k, unit(mk), rtol=0, atol=1e-12)
    if g == 1:
        torch.testing.assert_close(q, k, rtol=0, atol=1e-12)  # the same vector is added to q and k


@pytest.mark.parametrize("mode", ["linear", "exp"])
def test_norms_temperature_and_logit_bound(mode):
    """Spec test 8: |q_h| = sqrt(d_h), |k_j| = |beta_j| sqrt(d_h) (RoPE preserves them), |logit| <= sqrt(d_h)|beta|."""
    hq, hk, dh = 4, 2, 16
    inp = make_inputs(hq=hq, hk=hk, dh=dh, lens=(7,), rotary_dim=8)
    inp["temperature"] = torch.tensor([-1.7, 2.3], dtype=F64)
    q, k, _, _ = naive_cca_prologue(**inp, num_heads=hq, num_kv_heads=hk, temperature_mode=mode)
    beta = inp["temperature"] if mode == "linear" else inp["temperature"].exp()
    torch.testing.assert_close(q.norm(dim=-1), torch.full((7, hq), dh**0.5, dtype=F64), rtol=1e-13, atol=0)
    torch.testing.assert_close(k.norm(dim=-1), (beta.abs() * dh**0.5).expand(7, hk), rtol=1e-13, atol=0)
    logits = torch.einsum("shd,thd->hst", q, k.repeat_interleave(hq // hk, 1)) * dh**-0.5
    bound = dh**0.5 * beta.abs().repeat_interleave(hq // hk)[:, None, None]
    assert (logits.abs() <= bound + 1e-12).all()
    assert (logits.abs() > 0.5 * bound).any()  # the bound is not vacuous


CASES = [  # hq, hk, dh, k1, k2, num_convs, rotary_dim, conv_bias, qk_mean, value_shift
    (4, 2, 8, 2, 2, 2, 4, True, True, True),
    (3, 3, 6, 3, 2, 2, 6, True, False, True),
    (6, 2, 4, 2, 3, 2, 0, False, True, False),
    (4, 1, 8, 4, 1, 2, 8, True, True, True),
    (2, 2, 8, 3, 2, 1, 4, True, True, True),
    (4, 2, 8, 2, 2, 0, 4, True, True, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "hq{}-hk{}-dh{}-k{}{}-convs{}-rot{}-b{}-m{}-s{}".format(*c))
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_path_matches_reference(case, with_state):
    hq, hk, dh, k1, k2, nconv, rot, cbias, qk_mean, vshift = case
    lens = (5, 0, 1, 7, 2)
    inp = make_inputs(hq=hq, hk=hk, dh=dh, lens=lens, k1=k1, k2=k2, num_convs=nconv, rotary_dim=rot, conv_bias=cbias)
    c = (hq + hk) * dh
    pad = (k1 - 1) * (nconv >= 1) + (k2 - 1) * (nconv == 2)
    kw = dict(num_heads=hq, num_kv_heads=hk, qk_mean=qk_mean, value_shift=vshift, return_final_state=True)
    if with_state:
        kw.update(
            initial_conv_state=torch.randn(5, c, pad, dtype=F64),
            initial_value_state=torch.randn(5, hk * dh // 2, dtype=F64),
        )
    ref = cca_prologue(**inp, **kw, impl="naive")
    out = cca_prologue(**inp, **kw, impl="torch")
    for a, b in zip([*out[:3], *out[3]], [*ref[:3], *ref[3]]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if with_state:  # the empty document keeps its state
        torch.testing.assert_close(out[3][0][1], kw["initial_conv_state"][1], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_chunks_resume_from_state(impl):
    hq, hk = 4, 2
    inp = make_inputs(hq=hq, hk=hk, lens=(9,), k1=3, k2=2)
    full = cca_prologue(**inp, num_heads=hq, num_kv_heads=hk, impl=impl)
    state, outs = (None, None), []
    for lo, hi in [(0, 1), (1, 5), (5, 9)]:  # chunks shorter and longer than P = 3
        part = {k: (v[lo:hi] if k in ("q0", "k0", "v_cur", "v_del", "cos", "sin") else v) for k, v in inp.items()}
        part["cu_seqlens"] = torch.tensor([0, hi - lo], dtype=torch.int32)
        q, k, v, final = cca_prologue(
            **part,
            num_heads=hq,
            num_kv_heads=hk,
            initial_conv_state=state[0],
            initial_value_state=state[1],
            return_final_state=True,
            impl=impl,
        )
        outs.append((q, k, v))
        state = final
    for i in range(3):
        torch.testing.assert_close(torch.cat([o[i] for o in outs]), full[i], rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("nconv", [0, 1, 2])
def test_decode_prologue_continues_prefill(impl, nconv):
    hq, hk, dh, n = 4, 2, 8, 6
    inp = make_inputs(hq=hq, hk=hk, dh=dh, lens=(n, n + 1), k1=2, k2=3, num_convs=nconv)
    kw = dict(num_heads=hq, num_kv_heads=hk)
    full = naive_cca_prologue(**inp, **kw)
    # prefill the first n - 1 (doc 0) and n (doc 1) tokens, then decode one token of each
    cu = inp["cu_seqlens"]
    take = torch.cat([torch.arange(0, n - 1), torch.arange(n, 2 * n)])
    last = torch.tensor([n - 1, 2 * n])
    pre = {k: (v[take] if k in ("q0", "k0", "v_cur", "v_del", "cos", "sin") else v) for k, v in inp.items()}
    pre["cu_seqlens"] = torch.tensor([0, n - 1, 2 * n - 1], dtype=torch.int32)
    _, _, _, (conv_state, value_state) = naive_cca_prologue(**pre, **kw, return_final_state=True)
    step = {k: inp[k][last] for k in ("q0", "k0", "v_cur", "v_del")}
    cos, sin = (inp["cos"][last], inp["sin"][last])
    conv_before = conv_state.clone()
    q, k, v = cca_decode_prologue(
        **step,
        conv_state=conv_state,
        value_state=value_state,
        conv1_weight=inp["conv1_weight"],
        conv1_bias=inp["conv1_bias"],
        conv2_weight=inp["conv2_weight"],
        conv2_bias=inp["conv2_bias"],
        temperature=inp["temperature"],
        cos=cos,
        sin=sin,
        **kw,
        impl=impl,
    )
    assert cu.tolist() == [0, n, 2 * n + 1]
    for a, b in zip((q, k, v), full[:3]):
        torch.testing.assert_close(a, b[last], rtol=0, atol=1e-12)
    qk_new = torch.cat([step["q0"], step["k0"]], -1)
    if conv_state.shape[-1]:
        torch.testing.assert_close(conv_state[..., -1], qk_new, rtol=0, atol=0)  # advanced in place
        torch.testing.assert_close(conv_state[..., :-1], conv_before[..., 1:], rtol=0, atol=0)
    torch.testing.assert_close(value_state, step["v_del"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["linear", "exp"])
def test_gradcheck_every_input(mode):
    """Spec test 9: fp64 gradcheck through conv weights and biases, temperature, latents and values."""
    hq, hk, dh = 2, 1, 4
    inp = make_inputs(hq=hq, hk=hk, dh=dh, lens=(3, 2), k1=2, k2=2, rotary_dim=2)
    names = ["q0", "k0", "v_cur", "v_del", "conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "temperature"]
    leaves = [inp[n].clone().requires_grad_() for n in names]

    def fn(*tensors):
        args = {**inp, **dict(zip(names, tensors))}
        q, k, v, (cs, vs) = cca_prologue(
            **args, num_heads=hq, num_kv_heads=hk, temperature_mode=mode, return_final_state=True, impl="torch"
        )
        return q, k, v, cs, vs

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_budget_of_reference(dtype):
    hq, hk = 4, 2
    inp = make_inputs(hq=hq, hk=hk, lens=(6, 5))
    ref = naive_cca_prologue(**inp, num_heads=hq, num_kv_heads=hk)
    low = {k: (v.to(dtype) if k not in ("cu_seqlens", "max_seqlen", "cos", "sin") else v) for k, v in inp.items()}
    low["cos"], low["sin"] = inp["cos"].float(), inp["sin"].float()
    out = cca_prologue(**low, num_heads=hq, num_kv_heads=hk, impl="torch")
    base = naive_cca_prologue(**low, num_heads=hq, num_kv_heads=hk)
    for name, a, r, b in zip("qkv", out[:3], ref[:3], base[:3]):
        assert a.dtype == dtype
        assert_close_budget(a, r, b, factor=2.0, name=name)


def test_bad_inputs_raise():
    inp = make_inputs()
    kw = dict(num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="impl='triton' cannot run this CCA prologue: dtype torch.float64"):
        cca_prologue(**inp, **kw, impl="triton")  # an explicit "triton" never falls back
    with pytest.raises(ValueError, match="impl must be one of"):
        cca_prologue(**inp, **kw, impl="cuda")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        cca_prologue(**inp, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="k0 must be"):
        cca_prologue(**{**inp, "k0": inp["k0"][:, :-1]}, **kw)
    with pytest.raises(ValueError, match="conv2_weight must be"):
        cca_prologue(**{**inp, "conv2_weight": inp["conv2_weight"][:, :4]}, **kw)
    with pytest.raises(ValueError, match="conv2_weight needs conv1_weight"):
        cca_prologue(**{**inp, "conv1_weight": None, "conv1_bias": None}, **kw)
    with pytest.raises(ValueError, match="temperature_mode"):
        cca_prologue(**inp, **kw, temperature_mode="softplus")
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D int32"):
        cca_prologue(**{**inp, "cu_seqlens": inp["cu_seqlens"].long()}, **kw)
    with pytest.raises(ValueError, match="initial_conv_state must be"):
        cca_prologue(**inp, **kw, initial_conv_state=torch.zeros(2, 48, 3, dtype=F64))
    with pytest.raises(ValueError, match="cos and sin must be given together"):
        cca_prologue(**{**inp, "sin": None}, **kw)
    step = {k: inp[k][:2] for k in ("q0", "k0", "v_cur", "v_del")}
    rest = {k: inp[k] for k in ("conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "temperature")}
    with pytest.raises(ValueError, match="conv_state must be"):
        cca_decode_prologue(
            **step,
            **rest,
            conv_state=torch.zeros(2, 48, 1, dtype=F64),
            value_state=torch.zeros(2, 8, dtype=F64),
            cos=None,
            sin=None,
            **kw,
        )
