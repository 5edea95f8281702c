"""Folded CCA prologue forward (``prologue_folded.py``): both convolutions as one GEMM over the latents.

The fold itself is checked against an fp64 composition of ``F.conv1d`` (the reference's conventions); the kernel
(``interpret``: fp32 under ``TRITON_INTERPRET=1``, tiny shapes, 16-row tiles) against the fp64 reference
``naive_cca_prologue`` for packed odd / empty / one-token documents, initial conv state, kernel sizes 2 and 3,
MHA / GQA / MQA, partial and full RoPE, biases on and off, value shift on and off; fp16 within the budget of plain
PyTorch fp16. ``gpu`` tests: bf16 folded and two-kernel forwards against fp64 at real shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.ops.test_cca_triton import CASES, LATENTS, WEIGHTS, _close, _ref, cast, make_case
from trimformer.ops.cca import cca_prologue
from trimformer.testing import assert_close_budget

triton = pytest.importorskip("triton")

from trimformer.ops.cca import prologue_folded, prologue_fwd  # noqa: E402
from trimformer.ops.cca.prologue_folded import fold_conv_weights  # noqa: E402

F64 = torch.float64


def _weights(c, dh, k1, k2, b1, b2, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype)
    return r(c, k1), r(c) if b1 else None, r(c, dh, k2), r(c) if b2 else None


@pytest.mark.parametrize("k1,k2", [(2, 2), (3, 2), (2, 3), (3, 3), (1, 3), (4, 1)])
@pytest.mark.parametrize("b1,b2", [(True, True), (False, True), (True, False), (False, False)])
def test_fold_equals_composed_convolutions_fp64(k1, k2, b1, b2):
    """``conv1d(conv1d(pad_P(X), w1, b1, groups=C), W2, b2, groups=H)`` equals one grouped ``conv1d`` with the
    folded ``[P + 1, d_h, C]`` weight (as ``[C, d_h, P + 1]``) and bias, on a random padded window."""
    heads, dh = 3, 5
    c, pad = heads * dh, (k1 - 1) + (k2 - 1)
    w1, bias1, w2, bias2 = _weights(c, dh, k1, k2, b1, b2)
    win = torch.randn(1, c, pad + 17, generator=torch.Generator().manual_seed(1), dtype=F64)
    want = F.conv1d(F.conv1d(win, w1[:, None, :], bias1, groups=c), w2, bias2, groups=heads)
    mf, bf = fold_conv_weights(w1, bias1, w2, bias2)
    assert mf.shape == (pad + 1, dh, c) and mf.dtype == F64 and mf.is_contiguous()
    assert (bf is None) == (not b1 and not b2)
    got = F.conv1d(win, mf.permute(2, 1, 0), bf, groups=heads)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_fold_dtype_and_bad_shapes():
    w1, b1, w2, b2 = _weights(8, 4, 2, 2, True, True, dtype=torch.bfloat16)
    mf, bf = fold_conv_weights(w1, b1, w2, b2, torch.float16)
    assert mf.dtype == torch.float16 and bf.dtype == torch.float32
    want, _ = fold_conv_weights(*(x.double() for x in (w1, b1, w2, b2)))
    assert torch.equal(mf, want.to(torch.float16))  # fp32 math on 16-bit inputs: exact before the single rounding
    with pytest.raises(ValueError, match="groups of d_h"):
        fold_conv_weights(w1[:6], b1, w2, b2)


@pytest.mark.interpret
@pytest.mark.parametrize("k1,k2,b1,b2", [(2, 2, True, True), (3, 2, False, True), (2, 3, True, False),
                                         (3, 3, False, False)])  # fmt: skip
@pytest.mark.parametrize("dh", [4, 40])
def test_fold_kernel_matches_torch_fold(k1, k2, b1, b2, dh):
    """The per-call Triton fold (``launch_fold``, fp32) equals :func:`fold_conv_weights` in fp64; d_h 40 spans two
    input-channel blocks (and a partial one) per output block, and output blocks straddle heads."""
    c = 3 * dh
    w = _weights(c, dh, k1, k2, b1, b2, seed=2)
    mf, bf = prologue_folded.launch_fold(*(x.float() if x is not None else None for x in w), torch.float32)
    want_m, want_b = fold_conv_weights(*w)
    _close(mf, want_m, 1e-6, "folded weight")
    assert (bf is None) == (want_b is None)
    if bf is not None:
        _close(bf, want_b, 1e-6, "folded bias")


def _without(inp, *keys):
    return {**inp, **{k: None for k in keys}}


FOLDED_CASES = {  # name: (make_case kwargs, op kwargs, weights set to None)
    "gqa-k3x3-one-token-docs-nobias": (dict(hq=4, hk=2, lens=(1, 13, 0, 1, 18), k1=3, k2=3, rotary_dim=8,
                                            states=True), dict(num_heads=4, num_kv_heads=2),
                                       ("conv1_bias", "conv2_bias")),
    "mha-b1only-noshift-exp": (dict(hq=2, hk=2, lens=(7, 16, 2), rotary_dim=4),
                               dict(num_heads=2, num_kv_heads=2, value_shift=False, temperature_mode="exp"),
                               ("conv2_bias",)),
    "mqa-b2only-full-rope-states": (dict(hq=3, hk=1, dh=16, lens=(20, 3), k1=3, rotary_dim=16, states=True),
                                    dict(num_heads=3, num_kv_heads=1, qk_mean=False), ("conv1_bias",)),
    "gqa-d40-k2x3": (dict(hq=4, hk=2, dh=40, lens=(19, 1), k2=3, rotary_dim=24, states=True),
                     dict(num_heads=4, num_kv_heads=2), ()),
}  # fmt: skip


def _folded_vs_reference(inp, kw, cfg=None, folded=None):
    """(kernel outputs, fp64 reference with final states) of the folded forward on ``inp`` (fp64) run in fp32;
    with ``folded`` (precomputed weights) through ``launch_folded_fwd``, the outputs only."""
    f = cast(inp, torch.float32)
    flags = {"qk_mean": True, "value_shift": True, "temperature_mode": "linear", **kw}
    meta = prologue_fwd.make_meta(f["q0"], f["conv1_weight"], f["conv2_weight"], f["cos"], **flags)
    cfg = cfg or prologue_folded.default_folded_config(meta.dh)
    args = [f[x] for x in (*LATENTS, *WEIGHTS, "cos", "sin", "cu_seqlens", "max_seqlen")]
    states = f.get("initial_conv_state"), f.get("initial_value_state")
    if folded is None:
        got = prologue_fwd.cca_prologue_fwd(meta, *args, *states, True, config=cfg)
    else:
        t = f["q0"].shape[0]
        got = (f["q0"].new_empty(t, meta.hq, meta.dh), *(f["q0"].new_empty(t, meta.hk, meta.dh) for _ in range(2)))
        prologue_folded.launch_folded_fwd(meta, *args, *states, *got, config=cfg, folded=folded)
    return got, _ref(inp, kw, return_final_state=True)


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(FOLDED_CASES))
def test_folded_forward_fp32(name):
    case, kw, off = FOLDED_CASES[name]
    inp = _without(make_case(**case), *off)
    got, (q, k, v, (cs, vs)) = _folded_vs_reference(inp, kw)
    for a, b, what in zip((*got[:3], *got[3]), (q, k, v, cs, vs), ("q", "k", "v", "conv_state", "value_state")):
        assert a.dtype == torch.float32, what
        _close(a, b, 3e-6, what)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "cfg", [prologue_fwd.GemmFwdConfig(16, 4, 1, block_k=16, early_epilogue=True, folded=True),
            prologue_fwd.GemmFwdConfig(32, 4, 2, folded=True, max_regs=168)], ids=["bk16-early", "rows32-late-cap"],
)  # fmt: skip
def test_folded_forward_launch_configs(cfg):
    """Reduction chunks inside a tap (16 of d_h 32), bias + qk-mean before or after the GEMM loop, 32-row tiles
    with a register cap (a launch option the interpreter accepts)."""
    case, kw = CASES["ccgqa-d32"]
    got, (q, k, v, _) = _folded_vs_reference(make_case(**case), kw, cfg)
    for a, b, what in zip(got[:3], (q, k, v), "qkv"):
        _close(a, b, 3e-6, what)


def test_default_config_by_shape(monkeypatch):
    """The compiled-GPU defaults (NOTES v7): 128-row tiles without grouping or from WIDE_TILE_ROWS rows at d_h 128,
    64-row capped tiles for short grouped inputs, 8 warps above d_h 128."""
    monkeypatch.setattr(prologue_folded, "interpreting", lambda: False)
    prologue_folded._folded_config.cache_clear()
    try:
        wide = prologue_folded.default_folded_config(128, 4096, 1)
        assert (wide.block_t, wide.num_warps, wide.num_stages, wide.max_regs) == (128, 4, 3, 0)
        narrow = prologue_folded.default_folded_config(128, prologue_folded.WIDE_TILE_ROWS - 1, 4)
        assert (narrow.block_t, narrow.num_warps, narrow.max_regs) == (64, 4, 168)
        assert prologue_folded.default_folded_config(128, prologue_folded.WIDE_TILE_ROWS, 4).block_t == 128
        assert prologue_folded.default_folded_config(64, 1 << 20, 1).block_t == 64
        assert prologue_folded.default_folded_config(256, 1 << 20, 1).num_warps == 8
        cfgs = [prologue_folded.default_folded_config(d, 1, g) for d in (64, 128, 256) for g in (1, 4)]
        assert all(c.folded and c.early_epilogue for c in cfgs)
    finally:
        prologue_folded._folded_config.cache_clear()


@pytest.mark.interpret
def test_folded_forward_grid_split_and_precomputed_weights(monkeypatch):
    """Launched in slices of two documents (as beyond 65535 documents): each slice finds its documents' states;
    precomputed folded weights (:func:`fold_conv_weights`) give the same outputs; wrong ones raise."""
    monkeypatch.setattr(prologue_folded, "_MAX_GRID", 2)
    case, kw = CASES["mqa-k2x3-norope-off"]
    inp = make_case(**{**case, "lens": (9, 0, 4, 17, 1)})
    f = cast(inp, torch.float32)
    folded = fold_conv_weights(*(f[x] for x in WEIGHTS[:4]))
    for pre in (None, folded):
        got, (q, k, v, _) = _folded_vs_reference(inp, kw, folded=pre)
        for a, b, what in zip(got[:3], (q, k, v), "qkv"):
            _close(a, b, 3e-6, what)
    with pytest.raises(ValueError, match="folded weights must be"):
        _folded_vs_reference(inp, kw, folded=(folded[0][:-1], folded[1]))


def test_dispatch_default_and_flag(monkeypatch):
    """Prefill with both convolutions runs the folded forward by default; ``FOLD_CONVS = False`` or a
    ``GemmFwdConfig(folded=False)`` runs the two-kernel one (the benchmark times both)."""
    from trimformer.ops.cca import prologue_gemm

    calls = []
    monkeypatch.setattr(prologue_folded, "launch_folded_fwd", lambda *a, **k: calls.append("folded"))
    monkeypatch.setattr(prologue_gemm, "launch_gemm_fwd", lambda *a, **k: calls.append("twokernel"))
    case, kw = CASES["ccgqa-k2x2-empty-doc"]
    f = cast(make_case(**case), torch.float32)
    meta = prologue_fwd.make_meta(f["q0"], f["conv1_weight"], f["conv2_weight"], f["cos"], qk_mean=True,
                                  value_shift=True, temperature_mode="linear", **kw)  # fmt: skip
    args = [f[x] for x in (*LATENTS, *WEIGHTS, "cos", "sin", "cu_seqlens", "max_seqlen")]
    run = lambda **c: prologue_fwd.cca_prologue_fwd(meta, *args, None, None, False, **c)
    run()
    run(config=prologue_fwd.GemmFwdConfig(16, 4, 1))
    monkeypatch.setattr(prologue_fwd, "FOLD_CONVS", False)
    run()
    run(config=prologue_fwd.GemmFwdConfig(16, 4, 1, folded=True))
    assert calls == ["folded", "twokernel", "twokernel", "folded"]


# ----------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hk,dh", [(4, 4, 128), (8, 2, 128), (16, 4, 64), (2, 2, 256)])
def test_gpu_bf16_folded_and_two_kernel_forward(hq, hk, dh):
    """bf16 at real shapes: the folded and the two-kernel forward each within 2x of PyTorch bf16's error against
    fp64 (q, k, v and with an initial conv state); the Triton fold equals the PyTorch fold up to rounding."""
    inp = make_case(hq=hq, hk=hk, dh=dh, lens=(1100, 37, 1, 1911), rotary_dim=dh // 2, states=True, device="cuda")
    kw = dict(num_heads=hq, num_kv_heads=hk)
    ref = _ref(inp, kw)
    bf = cast(inp, torch.bfloat16)
    base = cca_prologue(**bf, **kw, impl="torch")
    meta = prologue_fwd.make_meta(bf["q0"], bf["conv1_weight"], bf["conv2_weight"], bf["cos"], qk_mean=True,
                                  value_shift=True, temperature_mode="linear", **kw)  # fmt: skip
    args = [bf[x] for x in (*LATENTS, *WEIGHTS, "cos", "sin", "cu_seqlens", "max_seqlen")]
    errs = {}
    for fold in (True, False):
        cfg = prologue_fwd.GemmFwdConfig(64, 4 if dh <= 128 else 8, 2, early_epilogue=True, folded=fold)
        got = prologue_fwd.cca_prologue_fwd(meta, *args, bf["initial_conv_state"], bf["initial_value_state"], False,
                                            config=cfg)  # fmt: skip
        for a, r, b, what in zip(got[:3], ref[:3], base[:3], "qkv"):
            assert a.dtype == torch.bfloat16
            assert_close_budget(a, r, b, name=f"{'folded' if fold else 'two-kernel'} {what}")
        errs[fold] = max((a.double() - r).abs().max().item() for a, r in zip(got[:2], ref[:2]))
    print(f"max|err| q/k: folded {errs[True]:.3e}, two-kernel {errs[False]:.3e}")
    mf, bias = prologue_folded.launch_fold(*(bf[x] for x in WEIGHTS[:4]), torch.bfloat16)
    want_m, want_b = fold_conv_weights(*(bf[x] for x in WEIGHTS[:4]), torch.bfloat16)
    torch.testing.assert_close(mf.float(), want_m.float(), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(bias, want_b, rtol=1e-5, atol=1e-5)
