"""Fused Triton CCA prologue (forward, backward, decode) against the fp64 reference ``naive_cca_prologue``.

``interpret`` tests run the kernels on CPU under ``TRITON_INTERPRET=1`` (fp32/fp16, tiny shapes, 16-row tiles so
documents span several tiles and the halo crosses tile borders; packed documents of odd and empty lengths, initial
states, every switch). ``gpu`` tests run bf16 at real shapes: outputs within 2x of the PyTorch path's bf16 error and
gradient cosine >= 0.999 against fp64, decode state round trips and CUDA-graph capture.
"""

from __future__ import annotations

import math

import pytest
import torch

from trimformer.ops.cca import cca_decode_prologue, cca_prologue, naive_cca_decode_prologue, naive_cca_prologue
from trimformer.ops.rope import rotary_cos_sin
from trimformer.testing import assert_close_budget
from trimformer.testing.sm90 import compile_for_sm90, has_nvidia_backend

triton = pytest.importorskip("triton")

from trimformer.ops.cca import prologue_bwd, prologue_fwd, prologue_gemm  # noqa: E402

F64 = torch.float64
WEIGHTS = ("conv1_weight", "conv1_bias", "conv2_weight", "conv2_bias", "temperature")
LATENTS = ("q0", "k0", "v_cur", "v_del")


def make_case(hq=4, hk=2, dh=8, lens=(5, 0, 20, 1), k1=2, k2=2, num_convs=2, rotary_dim=4, states=False,
              device="cpu", scale_w2=1.0, seed=0):  # fmt: skip
    """fp64 op inputs (strong O(1) convs) for packed documents ``lens``; optional random initial states."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    cq, ck = hq * dh, hk * dh
    c, t = cq + ck, sum(lens)
    pad = {0: 0, 1: k1 - 1, 2: (k1 - 1) + (k2 - 1)}[num_convs]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens]) if t else torch.zeros(0, dtype=torch.long)
    cos, sin = rotary_cos_sin(pos, rotary_dim, 100.0, dtype=F64) if rotary_dim else (None, None)
    inp = dict(
        q0=r(t, cq), k0=r(t, ck), v_cur=r(t, ck // 2), v_del=r(t, ck // 2),
        conv1_weight=r(c, k1) if num_convs >= 1 else None, conv1_bias=r(c) if num_convs >= 1 else None,
        conv2_weight=scale_w2 * r(c, dh, k2) / math.sqrt(dh * k2) if num_convs == 2 else None,
        conv2_bias=r(c) if num_convs == 2 else None, temperature=torch.rand(hk, generator=g, dtype=F64) + 0.5,
        cos=cos, sin=sin, cu_seqlens=cu, max_seqlen=max(lens),
    )  # fmt: skip
    if states:
        inp["initial_conv_state"] = r(len(lens), c, pad)
        inp["initial_value_state"] = r(len(lens), ck // 2)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inp.items()}


def cast(inp, dtype):
    """Latents, weights and states in ``dtype``; RoPE tables in fp32 (as the layers build them)."""
    out = {}
    for k, v in inp.items():
        if torch.is_tensor(v) and v.is_floating_point():
            v = v.float() if k in ("cos", "sin") else v.to(dtype)
        out[k] = v
    return out


CASES = {  # name: (make_case kwargs, op kwargs)
    "ccgqa-k2x2-empty-doc": (dict(), dict(num_heads=4, num_kv_heads=2)),
    "cca-k3x2-exp-states": (dict(hq=3, hk=3, lens=(17, 3), k1=3, rotary_dim=8, states=True),
                            dict(num_heads=3, num_kv_heads=3, temperature_mode="exp")),
    "mqa-k2x3-norope-off": (dict(hq=3, hk=1, dh=16, lens=(9, 2), k2=3, rotary_dim=0, states=True),
                            dict(num_heads=3, num_kv_heads=1, qk_mean=False, value_shift=False)),
    "one-conv-states": (dict(hq=2, hk=2, lens=(6, 3), num_convs=1, states=True), dict(num_heads=2, num_kv_heads=2)),
    "no-conv": (dict(hq=2, hk=2, lens=(6, 3), num_convs=0), dict(num_heads=2, num_kv_heads=2)),
    "ccgqa-d32": (dict(hq=4, hk=2, dh=32, lens=(19, 6), rotary_dim=16, states=True),
                  dict(num_heads=4, num_kv_heads=2)),
    "gqa-g4": (dict(hq=8, hk=2, dh=16, lens=(13, 1, 7), rotary_dim=8), dict(num_heads=8, num_kv_heads=2)),
    "gqa-g3": (dict(hq=6, hk=2, dh=16, lens=(11, 4), rotary_dim=8), dict(num_heads=6, num_kv_heads=2)),
}  # fmt: skip


def _ref(inp, kw, **extra):
    return naive_cca_prologue(**inp, **kw, **extra)


def _close(a, b, rel, what):
    """``a`` (kernel) equals ``b`` (fp64) to ``rel`` times ``max(1, max|b|)``; empty tensors only by shape."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    atol = rel * max(1.0, b.abs().max().item()) if b.numel() else 0.0
    torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=atol, msg=what)


# ----------------------------------------------------------------------------------------------- interpreter


def _force_path(monkeypatch, path):
    """Make the prefill forward take the one-kernel (``"fused"``), the two-kernel (``"twokernel"``: conv1 scratch +
    conv2 GEMM) or the folded one-GEMM (``"folded"``) path."""
    monkeypatch.setattr(prologue_fwd, "GEMM_MIN_ROWS", 1 << 62 if path == "fused" else 0)
    monkeypatch.setattr(prologue_fwd, "FOLD_CONVS", path == "folded")


@pytest.mark.interpret
@pytest.mark.parametrize("path", ["folded", "twokernel", "fused"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_final_state_fp32(name, path, monkeypatch):
    _force_path(monkeypatch, path)
    case, kw = CASES[name]
    inp = make_case(**case)
    q, k, v, (cs, vs) = _ref(inp, kw, return_final_state=True)
    got = cca_prologue(**cast(inp, torch.float32), **kw, return_final_state=True, impl="triton")
    for a, b, what in zip((*got[:3], *got[3]), (q, k, v, cs, vs), ("q", "k", "v", "conv_state", "value_state")):
        assert a.dtype == torch.float32, what
        _close(a, b, 3e-6, what)


@pytest.mark.interpret
def test_gemm_forward_grid_split_over_documents(monkeypatch):
    """The two-kernel forward launched in slices of documents (as beyond 65535 documents, here 2 per launch): each
    slice finds its documents' scratch rows (halo offsets count the documents before the slice) and states."""
    monkeypatch.setattr(prologue_gemm, "_MAX_GRID", 2)
    _force_path(monkeypatch, "twokernel")
    case, kw = CASES["mqa-k2x3-norope-off"]
    inp = make_case(**{**case, "lens": (9, 0, 4, 17, 1)})
    q, k, v, (cs, vs) = _ref(inp, kw, return_final_state=True)
    got = cca_prologue(**cast(inp, torch.float32), **kw, return_final_state=True, impl="triton")
    for a, b, what in zip((*got[:3], *got[3]), (q, k, v, cs, vs), ("q", "k", "v", "conv_state", "value_state")):
        _close(a, b, 3e-6, what)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "cfg", [prologue_fwd.GemmFwdConfig(16, 4, 1, 32, 4, block_k=16, early_epilogue=True),
            prologue_fwd.GemmFwdConfig(32, 4, 2, 16, 4)], ids=["bk16-early", "rows32"],
)  # fmt: skip
def test_gemm_forward_launch_configs(cfg):
    """Other two-kernel launch configurations (reduction chunks inside a tap, bias + qk-mean before the GEMM loop,
    other row tiles) compute the same q, k, v, final states included."""
    case, kw = CASES["ccgqa-d32"]
    inp = make_case(**case)
    f = cast(inp, torch.float32)
    meta = prologue_fwd.make_meta(f["q0"], f["conv1_weight"], f["conv2_weight"], f["cos"], qk_mean=True,
                                  value_shift=True, temperature_mode="linear", **kw)  # fmt: skip
    args = [f[x] for x in (*LATENTS, *WEIGHTS[:4], "temperature", "cos", "sin", "cu_seqlens", "max_seqlen")]
    got = prologue_fwd.cca_prologue_fwd(meta, *args, f["initial_conv_state"], f["initial_value_state"], True,
                                        config=cfg)  # fmt: skip
    q, k, v, (cs, vs) = _ref(inp, kw, return_final_state=True)
    for a, b, what in zip((*got[:3], *got[3]), (q, k, v, cs, vs), ("q", "k", "v", "conv_state", "value_state")):
        _close(a, b, 3e-6, what)


@pytest.mark.interpret
@pytest.mark.parametrize(("path", "k1"), [("folded", 2), ("folded", 3), ("twokernel", 2)])
def test_forward_fp16_within_budget_of_torch_fp16(path, k1, monkeypatch):
    _force_path(monkeypatch, path)
    inp = make_case(hq=4, hk=2, dh=16, lens=(23, 9), k1=k1, rotary_dim=8, states=True)
    kw = dict(num_heads=4, num_kv_heads=2)
    ref = _ref(inp, kw)
    base = cca_prologue(**cast(inp, torch.float16), **kw, impl="torch")
    got = cca_prologue(**cast(inp, torch.float16), **kw, impl="triton")
    for a, r, b, what in zip(got[:3], ref[:3], base[:3], "qkv"):
        assert a.dtype == torch.float16
        assert_close_budget(a, r, b, name=f"fp16 {what}")


def _grads(fn, inp, keys, cot):
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in keys if inp.get(k) is not None}
    out = fn({**inp, **leaves})
    sum((o * c.to(o.dtype)).sum() for o, c in zip(out, cot)).backward()
    return out, {k: (t.grad if t.grad is not None else torch.zeros_like(t)) for k, t in leaves.items()}


BWD_CASES = [("ccgqa-k2x2-empty-doc", 0, 0), ("cca-k3x2-exp-states", 16, 48), ("mqa-k2x3-norope-off", 0, 0),
             ("one-conv-states", 0, 0), ("no-conv", 0, 0), ("ccgqa-d32", 16, 0)]  # fmt: skip


@pytest.mark.interpret
@pytest.mark.parametrize("name,chunk,chunk_w", BWD_CASES)
def test_backward_matches_reference_fp32(name, chunk, chunk_w, monkeypatch):
    """Every input's gradient (latents, both convs, biases, temperature, both initial states) vs fp64 autograd;
    ``chunk=16`` splits each document's rows over several dX/dW2 programs (partial weight-gradient sums) and the
    input channels into 16-wide blocks (two blocks at d_h = 32); ``chunk_w=48``: the dW2 programs walk longer
    chunks than the dX ones (two partial buffers with different row counts)."""
    if chunk:
        cfg = prologue_bwd.BwdConfig(16, 4, 16, 16, 4, chunk_rows=chunk, chunk_rows_w=chunk_w)
        monkeypatch.setattr(prologue_bwd, "default_bwd_config", lambda dh: cfg)
    case, kw = CASES[name]
    inp = make_case(**case)
    keys = (*LATENTS, *WEIGHTS, "initial_conv_state", "initial_value_state")
    ref = _ref(inp, kw)
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(x.shape, generator=g, dtype=F64) for x in ref[:3]]
    _, want = _grads(lambda a: _ref(a, kw)[:3], inp, keys, cot)
    _, got = _grads(lambda a: cca_prologue(**a, **kw, impl="triton")[:3], cast(inp, torch.float32), keys, cot)
    assert set(got) == set(want)
    for key in want:
        _close(got[key], want[key], 5e-6, key)


def test_dy2_scratch_dtype_rule():
    cfg = prologue_bwd.BwdConfig(16, 4, 16, 16, 4)
    assert cfg.scratch_dtype(torch.bfloat16) == torch.bfloat16  # "auto": the conv2 dots round dY2 to bf16 anyway
    assert cfg.scratch_dtype(torch.float16) == torch.float32  # fp16 could overflow
    assert cfg.scratch_dtype(torch.float32) == torch.float32
    assert prologue_bwd.BwdConfig(16, 4, 16, 16, 4, scratch="input").scratch_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="scratch"):
        prologue_bwd.BwdConfig(16, 4, 16, 16, 4, scratch="fp8").scratch_dtype(torch.float16)


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["cca-k3x2-exp-states", "one-conv-states", "no-conv"])
def test_backward_16bit_dy2_scratch_fp16(name, monkeypatch):
    """The 16-bit ``dY2`` scratch (what bf16 input uses on the GPU; fp16 here, as the interpreter's bf16 is broken):
    every gradient within 3x of PyTorch fp16's error against fp64, for two convs, one conv (dY2 read directly) and
    none (the qk-mean terms)."""
    case, kw = CASES[name]
    inp = make_case(**case)
    keys = (*LATENTS, *WEIGHTS, "initial_conv_state", "initial_value_state")
    ref = _ref(inp, kw)
    g = torch.Generator().manual_seed(2)
    cot = [torch.randn(x.shape, generator=g, dtype=F64) for x in ref[:3]]
    _, want = _grads(lambda a: _ref(a, kw)[:3], inp, keys, cot)
    h = cast(inp, torch.float16)
    _, base = _grads(lambda a: cca_prologue(**a, **kw, impl="torch")[:3], h, keys, cot)
    cfg = prologue_bwd.BwdConfig(16, 4, 16, 16, 4, scratch="input")
    monkeypatch.setattr(prologue_bwd, "default_bwd_config", lambda dh: cfg)
    _, got = _grads(lambda a: cca_prologue(**a, **kw, impl="triton")[:3], h, keys, cot)
    for key in want:
        assert_close_budget(got[key], want[key], base[key], factor=3.0, name=f"fp16-scratch d{key}")


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["ccgqa-k2x2-empty-doc", "cca-k3x2-exp-states", "one-conv-states", "no-conv"])
def test_decode_step_matches_reference_and_updates_states(name):
    case, kw = CASES[name]
    inp = make_case(**{**case, "lens": (1, 1, 1), "states": True})
    args = lambda d: [d[x] for x in LATENTS]
    rest = lambda d: [d[x] for x in (*WEIGHTS, "cos", "sin")]
    cs, vs = inp["initial_conv_state"].clone(), inp["initial_value_state"].clone()
    ref = naive_cca_decode_prologue(*args(inp), cs, vs, *rest(inp), **kw)
    f32 = cast(inp, torch.float32)
    cs32, vs32 = f32["initial_conv_state"].clone(), f32["initial_value_state"].clone()
    got = cca_decode_prologue(*args(f32), cs32, vs32, *rest(f32), **kw, impl="triton")
    for a, b, what in zip((*got, cs32, vs32), (*ref, cs, vs), ("q", "k", "v", "conv_state", "value_state")):
        _close(a, b, 3e-6, what)


@pytest.mark.interpret
def test_chunked_prefill_then_decode_equals_one_prefill():
    """Spec test 4 on the kernels: prefill a prefix with final states, resume a chunk from them, then decode token by
    token with the in-place states; every q, k, v equals one prefill of the whole documents."""
    lens = (11, 7)
    inp = cast(make_case(hq=4, hk=2, lens=lens, k1=3, rotary_dim=4), torch.float32)
    kw = dict(num_heads=4, num_kv_heads=2, temperature_mode="exp")
    full = cca_prologue(**inp, **kw, impl="triton")
    starts = torch.tensor([0, lens[0]])
    rows = lambda lo, hi: torch.cat([torch.arange(s + lo, s + hi) for s in starts.tolist()])

    def piece(lo, hi, **states):
        idx = rows(lo, hi)
        part = {k: inp[k][idx] for k in (*LATENTS, "cos", "sin")}
        cu = torch.arange(3, dtype=torch.int32) * (hi - lo)
        return cca_prologue(**part, **{k: inp[k] for k in WEIGHTS}, cu_seqlens=cu, max_seqlen=hi - lo, **kw,
                            return_final_state=True, impl="triton", **states)  # fmt: skip

    q1, k1, v1, (cs, vs) = piece(0, 3)
    q2, k2, v2, (cs, vs) = piece(3, 5, initial_conv_state=cs, initial_value_state=vs)
    outs = [(q1, k1, v1), (q2, k2, v2)]
    for t in range(5, 7):  # decode: one token of each document per step
        idx = rows(t, t + 1)
        outs.append(cca_decode_prologue(*[inp[x][idx] for x in LATENTS], cs, vs, *[inp[x] for x in WEIGHTS],
                                        inp["cos"][idx], inp["sin"][idx], **kw, impl="triton"))  # fmt: skip
    order = torch.cat([rows(0, 3), rows(3, 5), rows(5, 6), rows(6, 7)])
    for i, what in enumerate("qkv"):
        got = torch.cat([o[i] for o in outs])
        _close(got, full[i][order].double(), 2e-6, what)


@pytest.mark.interpret
def test_explicit_triton_raises_and_auto_falls_back():
    inp = cast(make_case(), torch.float32)
    kw = dict(num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="cos/sin require grad"):
        cca_prologue(**{**inp, "cos": inp["cos"].clone().requires_grad_()}, **kw, impl="triton")
    w = inp["conv2_weight"].clone().requires_grad_()
    with pytest.raises(ValueError, match="return_final_state while autograd"):
        cca_prologue(**{**inp, "conv2_weight": w}, **kw, return_final_state=True, impl="triton")
    ref = cca_prologue(**inp, **kw, impl="torch")
    auto = cca_prologue(**inp, **kw, impl="auto")  # CPU tensors: "auto" takes the PyTorch path, no kernel
    for a, b in zip(auto[:3], ref[:3]):
        assert torch.equal(a, b)
    dec = make_case(lens=(1, 1), states=True)
    dec = cast(dec, torch.float32)
    q0 = dec["q0"].clone().requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        cca_decode_prologue(q0, *[dec[x] for x in LATENTS[1:]], dec["initial_conv_state"], dec["initial_value_state"],
                            *[dec[x] for x in (*WEIGHTS, "cos", "sin")], **kw, impl="triton")  # fmt: skip


# Compiles (never launches) every prologue kernel for sm_90 with Triton's real compiler (frontend + ptxas) in a
# subprocess with TRITON_INTERPRET=0 and a stand-in driver: the interpreter runs code the GPU compiler rejects (e.g. a
# runtime if/else that re-binds one name to tiles of two shapes), which this catches on a CPU-only machine.
_SM90_COMPILE = r"""
from trimformer.ops.cca import prologue_bwd as pb, prologue_folded as pfo, prologue_fwd as pf, prologue_gemm as pg
pb.num_sms = tu.num_sms

def case(hq, hk, dh, dt, convs, rot, **flags):
    t, c = 64, (hq + hk) * dh
    r = lambda *s: torch.randn(*s).to(dt)
    lat = [r(t, hq * dh), r(t, hk * dh), r(t, hk * dh // 2), r(t, hk * dh // 2)]
    w1, b1 = (r(c, 2), r(c)) if convs >= 1 else (None, None)
    w2, b2 = (r(c, dh, 2), r(c)) if convs == 2 else (None, None)
    cos, sin = (torch.randn(t, rot // 2), torch.randn(t, rot // 2)) if rot else (None, None)
    cu = torch.tensor([0, 40, t], dtype=torch.int32)
    meta = pf.make_meta(lat[0], w1, w2, cos, num_heads=hq, num_kv_heads=hk, **flags)
    cst = r(2, c, meta.pad) if meta.pad else None
    vst = r(2, hk * dh // 2)
    w = [w1, b1, w2, b2, r(hk)]
    pf.cca_prologue_fwd(meta, *lat, *w, cos, sin, cu, 40, cst, vst, True, config=pf.default_fwd_config(dh))
    if convs == 2:
        pf.cca_prologue_fwd(meta, *lat, *w, cos, sin, cu, 40, cst, vst, False, config=pg.default_gemm_config(dh))
        for state in (cst, None):  # the folded forward with and without the initial conv state (+ its fold launch),
            for rows in (40, 1 << 20):  # in the configurations for short and long inputs
                pf.cca_prologue_fwd(meta, *lat, *w, cos, sin, cu, 40, state, vst, False,
                                    config=pfo.default_folded_config(dh, rows, hq // hk))
    pf.cca_decode_prologue_fwd(meta, *[x[:2] for x in lat], r(2, c, meta.pad), vst.clone(), *w,
                               cos[:2] if rot else None, sin[:2] if rot else None)
    g = [r(t, hq, dh), r(t, hk, dh), r(t, hk, dh)]
    pb.cca_prologue_bwd(meta, *g, lat[0], lat[1], w1, b1, pf.conv2_transposed(w2), b2, w[4], cos, sin, cu, 40,
                        cst, tuple(vst.shape), need_cst_grad=cst is not None)

flags = dict(qk_mean=True, value_shift=True, temperature_mode="linear")
case(8, 2, 128, torch.bfloat16, 2, 64, **flags)
case(4, 4, 256, torch.bfloat16, 2, 128, **{**flags, "temperature_mode": "exp"})
case(4, 2, 64, torch.float16, 1, 0, qk_mean=False, value_shift=False, temperature_mode="linear")
case(3, 3, 48, torch.float32, 0, 48, **flags)
print("compiled", len(kernels), sorted({name for name, _ in kernels}))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel (prefill: one-kernel, two-kernel and folded with its fold launch; decode; the four backward
    launches) compiles for sm_90 across head dims, head layouts, dtypes and switches: checked on the CPU with Triton's
    compiler and ptxas, no GPU needed."""
    if not has_nvidia_backend():
        pytest.skip("this Triton build has no NVIDIA backend (compiler and ptxas) to compile sm_90 kernels with")
    proc = compile_for_sm90(_SM90_COMPILE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = {"_cca_fwd_kernel", "_conv1_scratch_kernel", "_conv2_gemm_kernel", "_folded_gemm_kernel", "_fold_kernel",
             "_final_state_kernel", "_cca_bwd_norm_kernel", "_cca_bwd_dx_kernel", "_cca_bwd_dw2_kernel",
             "_reduce_kernel"}  # fmt: skip
    assert all(n in proc.stdout for n in names), proc.stdout


# ----------------------------------------------------------------------------------------------------- GPU


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


GPU_SHAPES = {  # (hq, hk, dh): CCA-4x at E = 2048 for d_h 128 and 256, CCGQA-2x/8x at d_h 64 (d_h 128 CCGQA: layers)
    "cca4x-d128": (4, 4, 128),
    "ccgqa-d64": (16, 4, 64),
    "cca4x-d256": (2, 2, 256),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_gpu_bf16_forward_and_gradients(name):
    hq, hk, dh = GPU_SHAPES[name]
    lens = (1100, 37, 1911)
    inp = make_case(hq=hq, hk=hk, dh=dh, lens=lens, rotary_dim=dh // 2, states=True, device="cuda")
    kw = dict(num_heads=hq, num_kv_heads=hk)
    keys = (*LATENTS, *WEIGHTS, "initial_conv_state", "initial_value_state")
    ref = _ref(inp, kw)
    cot = [torch.randn_like(x) for x in ref[:3]]
    _, want = _grads(lambda a: _ref(a, kw)[:3], inp, keys, cot)
    bf = cast(inp, torch.bfloat16)
    base_out, base = _grads(lambda a: cca_prologue(**a, **kw, impl="torch")[:3], bf, keys, cot)
    out, got = _grads(lambda a: cca_prologue(**a, **kw, impl="triton")[:3], bf, keys, cot)
    for a, r, b, what in zip(out, ref[:3], base_out, "qkv"):
        assert a.dtype == torch.bfloat16
        assert_close_budget(a.detach(), r, b.detach(), name=f"{name} {what}")
    for key in want:
        cos_ours, cos_torch = _cosine(got[key], want[key]), _cosine(base[key], want[key])
        assert cos_ours >= 0.999, f"{key}: gradient cosine {cos_ours:.5f} (PyTorch bf16: {cos_torch:.5f})"


@pytest.mark.gpu
def test_gpu_decode_round_trip_and_cuda_graph():
    """bf16: prefill with final states, then decode steps captured in a CUDA graph, equal one prefill."""
    hq, hk, dh, n_pre, steps = 8, 2, 128, 300, 4
    lens = (n_pre + steps,) * 3
    inp = cast(make_case(hq=hq, hk=hk, dh=dh, lens=lens, rotary_dim=64, device="cuda"), torch.bfloat16)
    kw = dict(num_heads=hq, num_kv_heads=hk)
    full = cca_prologue(**inp, **kw, impl="triton")
    starts = [i * lens[0] for i in range(3)]
    rows = lambda lo, hi: torch.cat([torch.arange(s + lo, s + hi, device="cuda") for s in starts])
    idx = rows(0, n_pre)
    part = {k: inp[k][idx] for k in (*LATENTS, "cos", "sin")}
    cu = torch.arange(4, dtype=torch.int32, device="cuda") * n_pre
    _, _, _, (cs, vs) = cca_prologue(**part, **{k: inp[k] for k in WEIGHTS}, cu_seqlens=cu, max_seqlen=n_pre, **kw,
                                     return_final_state=True, impl="triton")  # fmt: skip
    static = {k: inp[k][rows(n_pre, n_pre + 1)].clone() for k in (*LATENTS, "cos", "sin")}
    step = lambda: cca_decode_prologue(*[static[x] for x in LATENTS], cs, vs, *[inp[x] for x in WEIGHTS],
                                       static["cos"], static["sin"], **kw, impl="triton")  # fmt: skip
    cs_save, vs_save = cs.clone(), vs.clone()
    step()  # compile and warm up outside the capture, then restore the states
    cs.copy_(cs_save)
    vs.copy_(vs_save)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    cs.copy_(cs_save)
    vs.copy_(vs_save)
    for t in range(n_pre, n_pre + steps):
        for k in static:
            static[k].copy_(inp[k][rows(t, t + 1)])
        graph.replay()
        for i, what in enumerate("qkv"):
            want = full[i][rows(t, t + 1)].float()
            err = (out[i].float() - want).abs().max().item()
            assert err <= 2e-2 * max(1.0, want.abs().max().item()), f"step {t} {what}: {err}"
