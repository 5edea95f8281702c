"""Fused CCA down-projection + prologue (``cca_project_prologue``, ``project_fwd.py``) against the fp64 reference.

``interpret``: fp32 kernels on CPU under ``TRITON_INTERPRET=1`` with 16-row tiles (14 written, so documents span
several tiles, tiles span documents, and the conv halo crosses both), packed documents of odd, single-token and
empty lengths, every switch; fp16 within budget of the unfused PyTorch path; explicit ``impl="triton"`` raises on
what the kernel cannot take and ``"auto"`` runs the unfused path (autograd included). ``slow``: the
kernel compiles for sm_90. ``gpu``: bf16 at the benchmark's shapes (E = 2048) within 2x of the unfused PyTorch
bf16 error, and equal under CUDA-graph replay.
"""

from __future__ import annotations

import math

import pytest
import torch

from trimformer.ops.cca import cca_project_prologue, naive_cca_project_prologue
from trimformer.ops.rope import rotary_cos_sin
from trimformer.testing import assert_close_budget
from trimformer.testing.sm90 import compile_for_sm90, has_nvidia_backend

pytest.importorskip("triton")

from tests.ops.test_cca_triton import _close, cast  # noqa: E402  (dtype casting and the scaled closeness check)
from trimformer.ops.cca import project_fwd  # noqa: E402

F64 = torch.float64
BIASES = ("q_bias", "k_bias", "v_bias_current", "v_bias_delayed")


def make_case(hq=4, hk=2, dh=16, e=32, lens=(5, 0, 20, 1), k1=2, k2=2, rotary_dim=8, bias=True, value_state=True,
              device="cpu", seed=0):  # fmt: skip
    """fp64 ``(inputs, keyword arguments)`` of ``cca_project_prologue`` with O(1) latents and strong convolutions."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    cq, ck = hq * dh, hk * dh
    c, t = cq + ck, sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    cos, sin = rotary_cos_sin(pos, rotary_dim, 100.0, dtype=F64) if rotary_dim else (None, None)
    inp = dict(
        x=r(t, e), q_weight=r(cq, e) / math.sqrt(e), k_weight=r(ck, e) / math.sqrt(e),
        v_weight_current=r(ck // 2, e) / math.sqrt(e), v_weight_delayed=r(ck // 2, e) / math.sqrt(e),
        conv1_weight=r(c, k1), conv1_bias=r(c), conv2_weight=r(c, dh, k2) / math.sqrt(dh * k2), conv2_bias=r(c),
        temperature=torch.rand(hk, generator=g, dtype=F64) + 0.5, cos=cos, sin=sin, cu_seqlens=cu,
        max_seqlen=max(lens),
    )  # fmt: skip
    kw = dict(num_heads=hq, num_kv_heads=hk)
    if bias:
        kw.update(zip(BIASES, (r(cq), r(ck), r(ck // 2), r(ck // 2))))
    if value_state:
        kw["initial_value_state"] = r(len(lens), ck // 2)
    move = lambda v: v.to(device) if torch.is_tensor(v) else v
    return {k: move(v) for k, v in inp.items()}, {k: move(v) for k, v in kw.items()}


CASES = {  # name: (make_case kwargs, extra op kwargs)
    "ccgqa-empty-doc-bias": (dict(), dict()),
    "cca-k3x2-exp-nobias": (dict(hq=3, hk=3, lens=(17, 3), k1=3, rotary_dim=16, bias=False, value_state=False),
                            dict(temperature_mode="exp")),
    "mqa-k2x3-norope-off": (dict(hq=3, hk=1, dh=32, lens=(9, 2, 30), k2=3, rotary_dim=0),
                            dict(qk_mean=False, value_shift=False)),
    "ccgqa-d32-partial-rope": (dict(hq=4, hk=2, dh=32, lens=(19, 6), rotary_dim=16), dict()),
    "one-row-docs": (dict(hq=2, hk=2, lens=(1, 1, 0, 1, 3)), dict()),
}  # fmt: skip


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(CASES))
def test_fused_projection_matches_reference_fp32(name):
    case, extra = CASES[name]
    inp, kw = make_case(**case)
    ref = naive_cca_project_prologue(**inp, **kw, **extra)
    got = cca_project_prologue(**cast(inp, torch.float32), **cast(kw, torch.float32), **extra, impl="triton")
    for a, b, what in zip(got, ref, "qkv"):
        assert a.dtype == torch.float32, what
        _close(a, b, 3e-6, what)


@pytest.mark.interpret
def test_fused_projection_tile_configs_and_cached_conv2_layout():
    """Other tile heights (tiles of 32 - P rows; 64-row tiles covering everything at once) and a cached k-major
    conv2 weight give the same result."""
    inp, kw = make_case(lens=(23, 1, 40), k1=3, k2=3)
    ref = naive_cca_project_prologue(**inp, **kw)
    inp, kw = cast(inp, torch.float32), cast(kw, torch.float32)
    w2b = inp["conv2_weight"].permute(2, 1, 0).contiguous()
    for cfg in (project_fwd.ProjectConfig(32, 16, 4, 1), project_fwd.ProjectConfig(64, 32, 4, 1)):
        project_fwd.default_project_config.cache_clear()
        orig = project_fwd.default_project_config
        project_fwd.default_project_config = lambda dh, cfg=cfg: cfg
        try:
            got = cca_project_prologue(**inp, **kw, conv2_weight_k_major=w2b, impl="triton")
        finally:
            project_fwd.default_project_config = orig
        for a, b, what in zip(got, ref, "qkv"):
            _close(a, b, 3e-6, f"{cfg} {what}")


@pytest.mark.interpret
def test_fused_projection_fp16_within_budget_of_torch_fp16():
    inp, kw = make_case(hq=4, hk=2, dh=16, e=64, lens=(23, 9), rotary_dim=8)
    ref = naive_cca_project_prologue(**inp, **kw)
    base = cca_project_prologue(**cast(inp, torch.float16), **cast(kw, torch.float16), impl="torch")
    got = cca_project_prologue(**cast(inp, torch.float16), **cast(kw, torch.float16), impl="triton")
    for a, r, b, what in zip(got, ref, base, "qkv"):
        assert a.dtype == torch.float16
        assert_close_budget(a, r, b, name=f"fp16 {what}")


@pytest.mark.interpret
def test_explicit_triton_raises_and_auto_falls_back(monkeypatch):
    launches = []
    real = project_fwd.launch_project_fwd
    monkeypatch.setattr(project_fwd, "launch_project_fwd", lambda *a, **k: launches.append(1) or real(*a, **k))
    inp, kw = make_case()
    inp, kw = cast(inp, torch.float32), cast(kw, torch.float32)
    x = inp["x"].clone().requires_grad_()
    with pytest.raises(ValueError, match="inference-only"):
        cca_project_prologue(**{**inp, "x": x}, **kw, impl="triton")
    with pytest.raises(ValueError, match="both convolutions"):
        cca_project_prologue(**{**inp, "conv2_weight": None, "conv2_bias": None}, **kw, impl="triton")
    with pytest.raises(ValueError, match="some projections only"):
        cca_project_prologue(**inp, **{**kw, "k_bias": None}, impl="triton")
    with pytest.raises(ValueError, match="k_weight"):
        cca_project_prologue(**{**inp, "k_weight": inp["k_weight"][:-1]}, **kw, impl="triton")
    # gradients: "auto" runs F.linear + the differentiable prologue and matches the reference's gradient
    auto = cca_project_prologue(**{**inp, "x": x}, **kw, impl="auto")
    sum(o.sum() for o in auto).backward()
    xr = make_case()[0]["x"].clone().requires_grad_()
    ref = naive_cca_project_prologue(**{**make_case()[0], "x": xr}, **make_case()[1])
    sum(o.sum() for o in ref).backward()
    _close(x.grad, xr.grad, 1e-5, "dx through the unfused fallback")
    with torch.no_grad():
        cca_project_prologue(**inp, **kw, impl="auto")
    assert not launches, "'auto' must run the (faster) unfused path, not the fused kernel"
    cca_project_prologue(**inp, **kw, impl="triton")
    assert len(launches) == 1


_SM90_COMPILE = r"""
from trimformer.ops.cca import project_fwd as pj, prologue_fwd as pf

def case(hq, hk, dh, dt, rot, bias, **flags):
    t, e, c = 64, 256, (hq + hk) * dh
    r = lambda *s: torch.randn(*s).to(dt)
    ws = [r(hq * dh, e), r(hk * dh, e), r(hk * dh // 2, e), r(hk * dh // 2, e)]
    bs = [r(w.shape[0]) if bias else None for w in ws]
    cos, sin = (torch.randn(t, rot // 2), torch.randn(t, rot // 2)) if rot else (None, None)
    cu = torch.tensor([0, 40, t], dtype=torch.int32)
    w1, w2 = r(c, 2), r(c, dh, 2)
    flags = {"qk_mean": True, "value_shift": True, "temperature_mode": "linear", **flags}
    meta = pf.make_meta(r(t, hq * dh), w1, w2, cos, num_heads=hq, num_kv_heads=hk, **flags)
    out = [r(t, hq, dh), r(t, hk, dh), r(t, hk, dh)]
    pj.launch_project_fwd(meta, r(t, e), *ws, *bs, w1, r(c), w2.permute(2, 1, 0).contiguous(), r(c), r(hk), cos, sin,
                          cu, r(2, hk * dh // 2), *out, config=pj.ProjectConfig(64, 64, 4 if dh <= 128 else 8, 3))

case(8, 2, 128, torch.bfloat16, 64, False)
case(16, 4, 64, torch.float16, 0, False, qk_mean=False, value_shift=False)
case(2, 2, 256, torch.bfloat16, 128, True, temperature_mode="exp")
case(3, 1, 48, torch.float32, 48, True)
print("compiled", len(kernels), sorted({name for name, _ in kernels}))
"""


@pytest.mark.slow
def test_fused_projection_compiles_for_sm90():
    """The kernel compiles for sm_90 (Triton's compiler and ptxas on the CPU) across head dims (48-256), head
    layouts, dtypes and switches."""
    if not has_nvidia_backend():
        pytest.skip("this Triton build has no NVIDIA backend (compiler and ptxas) to compile sm_90 kernels with")
    proc = compile_for_sm90(_SM90_COMPILE, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "_project_prologue_kernel" in proc.stdout and "compiled 4" in proc.stdout, proc.stdout


GPU_SHAPES = {  # (hq, hk, dh, rotary_dim, bias) at E = 2048: the benchmark's CCA-4x and CCGQA-2x/8x, and others
    "cca4x-d128": (4, 4, 128, 128, False),
    "ccgqa-d128": (8, 2, 128, 64, False),
    "ccgqa-d64-bias": (16, 4, 64, 32, True),
    "cca4x-d256": (2, 2, 256, 128, False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_gpu_bf16_fused_projection(name):
    hq, hk, dh, rot, bias = GPU_SHAPES[name]
    inp, kw = make_case(hq=hq, hk=hk, dh=dh, e=2048, lens=(1100, 37, 1, 1911), rotary_dim=rot, bias=bias,
                        device="cuda")  # fmt: skip
    ref = naive_cca_project_prologue(**inp, **kw)
    bf, bkw = cast(inp, torch.bfloat16), cast(kw, torch.bfloat16)
    base = cca_project_prologue(**bf, **bkw, impl="torch")
    got = cca_project_prologue(**bf, **bkw, impl="triton")
    for a, r, b, what in zip(got, ref, base, "qkv"):
        assert a.dtype == torch.bfloat16
        assert_close_budget(a, r, b, name=f"{name} {what}")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = cca_project_prologue(**bf, **bkw, impl="triton")
    graph.replay()
    torch.cuda.synchronize()
    for a, b, what in zip(replayed, got, "qkv"):
        assert torch.equal(a, b), f"{name} {what}: CUDA-graph replay differs from the eager call"
