"""``linear`` (Triton GEMM with bias + activation epilogue, cuBLAS + fused kernel, PyTorch) vs the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from trimformer.ops.linear import api as linear_api
from trimformer.ops.linear import linear, linear_add_layer_norm, naive_linear, naive_linear_add_layer_norm
from trimformer.testing import assert_close_budget
from trimformer.testing.sm90 import compile_for_sm90, has_nvidia_backend

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def _inputs(m, k, n, device="cpu"):
    g = torch.Generator().manual_seed(m * 31 + k * 7 + n)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(device)
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5).to(device)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    return x, w, b


def _check(m, k, n, act, dtype, device, impl, *, with_bias=True):
    x, w, b = _inputs(m, k, n, device)
    b = b if with_bias else None
    ref = naive_linear(x, w, b, act)
    lo = [None if t is None else t.to(dtype) for t in (x, w, b)]
    out = linear(*lo, act, impl=impl)
    assert out.dtype == dtype and out.shape == (m, n)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-5)
    else:
        baseline = naive_linear(*lo, act)  # fp32 accumulation, one rounding: the best a low-precision GEMM can do
        assert_close_budget(out, ref, baseline, factor=2.0, name=f"linear {impl} {act} {dtype} {m}x{k}x{n}")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", [None, "gelu", "gelu_new"])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 48, 48), (37, 48, 100), (70, 96, 33)])
def test_triton_gemm_matches_reference(dtype, act, m, k, n):
    _check(m, k, n, act, dtype, "cpu", "triton")


@pytest.mark.interpret
def test_triton_gemm_without_bias_and_with_leading_dims():
    _check(9, 40, 24, "relu", torch.float32, "cpu", "triton", with_bias=False)
    x, w, b = (t.float() for t in _inputs(6, 32, 16))
    out = linear(x.view(2, 3, 32), w, b, "gelu", impl="triton")
    torch.testing.assert_close(out.view(6, 16), naive_linear(x, w, b, "gelu"), rtol=0, atol=5e-5)


KERNEL_PATHS = {  # (persistent, tma, split, ctas_per_sm): every kernel path the interpreter can run
    "tiles": (False, False, 1, 1),
    "tiles-split": (False, False, 2, 1),
    "persistent": (True, False, 1, 1),
    "tma": (False, True, 1, 1),
    "tma-split": (False, True, 2, 1),
    "tma-persistent-split": (True, True, 2, 2),
}


@pytest.mark.interpret
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gemm_kernel_paths(path, dtype):
    """Pointer and TMA kernels, one program per tile or persistent, whole or split epilogue: more tiles than
    programs, ragged M, N and K (TMA zero-fills out-of-bounds reads and clips stores)."""
    from trimformer.ops.linear.gemm import GemmConfig, linear_fwd, tma_reason

    persistent, tma, split, ctas = KERNEL_PATHS[path]
    x, w, b = _inputs(70, 40, 56)
    cfg = GemmConfig(16, 32, 16, 2, 4, 1, persistent=persistent, tma=tma, split=split, ctas_per_sm=ctas)
    lo = [t.to(dtype) for t in (x, w, b)]
    out = linear_fwd(*lo, "gelu_erf", config=cfg)
    y = torch.empty(70, 56, dtype=dtype)
    assert (tma_reason(lo[0], lo[1], y) is None) == (dtype == torch.float16)  # fp32 runs the pointer kernel
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), naive_linear(x, w, b, "gelu"), rtol=0, atol=5e-5)
    else:
        assert_close_budget(out, naive_linear(x, w, b, "gelu"), naive_linear(*lo, "gelu"), factor=2.0, name=path)


@pytest.mark.interpret
def test_tma_kernel_strided_rows_and_fallback():
    """The TMA kernel reads a row-strided x view; rows whose stride is not 16-byte aligned fall back to pointers."""
    from trimformer.ops.linear.gemm import GemmConfig, linear_fwd, tma_reason

    x, w, b = (t.half() for t in _inputs(33, 48, 24))
    wide = torch.zeros(33, 64, dtype=torch.float16)
    wide[:, :48] = x
    cfg = GemmConfig(16, 16, 16, 1, 4, 1, tma=True)
    ref = naive_linear(x.double(), w.double(), b.double(), "relu")
    for view in (wide[:, :48], torch.zeros(33, 52, dtype=torch.float16)[:, :48].copy_(x)):
        out = linear_fwd(view, w, b, "relu", config=cfg)
        assert_close_budget(out, ref, naive_linear(x, w, b, "relu"), factor=2.0, name=str(view.stride()))
    assert tma_reason(wide[:, :48], w, torch.empty(33, 24, dtype=torch.float16)) is None
    assert "16-byte" in tma_reason(torch.zeros(33, 52, dtype=torch.float16)[:, :48], w, torch.empty(33, 24).half())


def test_config_validation():
    from trimformer.ops.linear.gemm import GemmConfig

    with pytest.raises(ValueError, match="split"):
        GemmConfig(64, 64, 64, 8, 4, 3, split=3)
    with pytest.raises(ValueError, match="split"):
        GemmConfig(64, 8, 64, 8, 4, 3, split=2)
    with pytest.raises(ValueError, match="ctas_per_sm"):
        GemmConfig(64, 64, 64, 8, 4, 3, ctas_per_sm=0)


@pytest.mark.parametrize("act", [None, "gelu", "silu"])
def test_torch_path_matches_reference(act):
    _check(11, 24, 20, act, torch.float32, "cpu", "torch")
    _check(11, 24, 20, act, torch.float32, "cpu", "auto")


def test_validation_and_autograd():
    x, w, b = (t.float() for t in _inputs(4, 8, 6))
    with pytest.raises(ValueError, match="weight must be"):
        linear(x, w[:, :-1], b)
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, w, b[:-1])
    with pytest.raises(ValueError, match="impl must be"):
        linear(x, w, b, impl="fast")
    with pytest.raises(ValueError, match="unsupported activation"):
        linear(x, w, b, "mish")
    with pytest.raises(ValueError, match="bias is torch.float64"):
        linear(x, w, b.double())
    w.requires_grad_(True)
    with pytest.raises(ValueError, match="require grad"):
        linear(x, w, b, "gelu", impl="triton")
    linear(x, w, b, "gelu").sum().backward()  # "auto" is differentiable
    assert w.grad is not None


def test_epilogue_policy_switch():
    old = dict(linear_api.EPILOGUE_POLICY)
    try:
        linear_api.EPILOGUE_POLICY["mode"] = "always"
        assert linear_api.use_gemm_epilogue(8, 8, 8, torch.float32)
        linear_api.EPILOGUE_POLICY["mode"] = "never"
        assert not linear_api.use_gemm_epilogue(10**6, 3072, 768, torch.float16)
    finally:
        linear_api.EPILOGUE_POLICY.update(old)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "auto"])
@pytest.mark.parametrize(("m", "k", "n", "act"), [(1, 768, 3072, "gelu"), (37, 768, 2304, None),
                                                  (4097, 768, 3072, "gelu"), (600, 3072, 768, None),
                                                  (300, 384, 1536, "gelu_new")])  # fmt: skip
def test_linear_gpu(dtype, impl, m, k, n, act):
    _check(m, k, n, act, dtype, "cuda", impl)


GPU_SHAPES = {"tiles": (64, 128, 64, 8, 4, 4), "tiles-split": (128, 128, 64, 8, 4, 3),
              "persistent": (128, 128, 64, 8, 8, 4), "tma": (128, 128, 64, 8, 4, 3),
              "tma-split": (128, 256, 64, 8, 8, 3), "tma-persistent-split": (128, 128, 64, 8, 4, 3)}  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("path", list(KERNEL_PATHS))
def test_linear_gpu_configs(path):
    from trimformer.ops.linear.gemm import GemmConfig, linear_fwd

    persistent, tma, split, ctas = KERNEL_PATHS[path]
    cfg = GemmConfig(*GPU_SHAPES[path], persistent=persistent, tma=tma, split=split, ctas_per_sm=ctas)
    for m, k, n, act in ((1000, 768, 3072, "gelu"), (333, 3072, 768, None), (77, 384, 1536, "gelu")):
        x, w, b = _inputs(m, k, n, "cuda")
        for dtype in (torch.float16, torch.bfloat16):
            lo = [t.to(dtype) for t in (x, w, b)]
            out = linear_fwd(*lo, "gelu_erf" if act else "identity", config=cfg)
            assert_close_budget(out, naive_linear(x, w, b, act), naive_linear(*lo, act), factor=2.0, name=str(cfg))


def test_tuner_bookkeeping_on_cpu():
    from trimformer.ops.linear import tune
    from trimformer.ops.linear.gemm import GemmConfig

    x, w, b = (t.float() for t in _inputs(40, 32, 24))
    calls = []
    assert tune.choose(x, w, b, "gelu_erf", lambda w: calls.append(1)) is None  # no search off the GPU
    assert not calls
    key = tune.tune_key(40, 24, 32, "gelu_erf", torch.float16, torch.device("cuda", 0))
    assert key == tune.tune_key(64, 24, 32, "gelu_erf", torch.float16, torch.device("cuda", 0))  # same bucket
    assert key != tune.tune_key(65, 24, 32, "gelu_erf", torch.float16, torch.device("cuda", 0))
    assert tune.lookup(key) == "unknown"
    try:
        tune.set_choice(key, GemmConfig(64, 64, 64, 8, 4, 4))
        assert tune.chose_triton(33, 24, 32, torch.float16) and not tune.chose_triton(33, 24, 32, torch.bfloat16)
        old = dict(linear_api.EPILOGUE_POLICY)
        linear_api.EPILOGUE_POLICY["mode"] = "measured"
        try:
            assert linear_api.use_gemm_epilogue(50, 24, 32, torch.float16) == torch.cuda.is_available()
        finally:
            linear_api.EPILOGUE_POLICY.update(old)
    finally:
        tune.clear()
    for m in (1, 300, 5000):
        cands = tune.candidate_configs(m, 3072, 768, torch.float16, 132)
        assert cands and len(set(cands)) == len(cands)
    assert tune.graph_calls(16, 768, 768) == 16 and tune.graph_calls(20000, 3072, 768) == 1  # latency vs GPU bound
    assert 1 < tune.graph_calls(350, 3072, 768) < 16


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n", "act"), [(300, 768, 3072, "gelu"), (4864, 768, 3072, "gelu")])
def test_tuned_auto_linear_gpu(m, k, n, act):
    from trimformer.ops.linear import tune

    tune.clear()
    _check(m, k, n, act, torch.float16, "cuda", "auto")  # searches, then runs the chosen path
    (times,) = tune.MEASURED.values()
    assert "cublas" in times and len(times) >= 2
    assert all(0 < t < 5 for t in times.values()), times  # GPU ms per call from graph replays
    _check(m, k, n, act, torch.float16, "cuda", "auto")  # the remembered choice
    assert len(tune.MEASURED) == 1


_SM90_COMPILE = r"""
from trimformer.ops.linear import gemm
gemm.num_sms = tu.num_sms
gemm.tma_reason = lambda *a: None  # CPU stand-in tensors: take the TMA kernel where a config asks for it
G = gemm.GemmConfig
x, w, b = torch.randn(4772, 768).half(), torch.randn(3072, 768).half(), torch.randn(3072).half()
for cfg in (G(128, 256, 64, 8, 8, 3, tma=True, split=2), G(128, 128, 64, 8, 4, 3, True, tma=True, split=2,
            ctas_per_sm=2), G(64, 128, 64, 8, 4, 4), G(128, 128, 64, 8, 4, 3, True, split=2)):
    gemm.linear_fwd(x, w, b, "gelu_erf", config=cfg)
    name, k = kernels[-1]
    ptx = k.asm["ptx"]
    tma = "cp.async.bulk.tensor" in ptx
    print(name, cfg.tma, "wgmma" if "wgmma.mma_async" in ptx else "no-wgmma", "tma" if tma else "no-tma",
          k.metadata.shared)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The TMA kernel (one program per tile and persistent, split epilogue) and the pointer kernel compile for sm_90
    at the FFN1 shape with wgmma, and the TMA one with bulk tensor copies: checked on the CPU with Triton's compiler
    and ptxas (the interpreter cannot tell), no GPU needed."""
    if not has_nvidia_backend():
        pytest.skip("this Triton build has no NVIDIA backend (compiler and ptxas) to compile sm_90 kernels with")
    proc = compile_for_sm90(_SM90_COMPILE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert [ln[:4] for ln in lines] == [
        ["_linear_tma_kernel", "True", "wgmma", "tma"],
        ["_linear_tma_kernel", "True", "wgmma", "tma"],
        ["_linear_kernel", "False", "wgmma", "no-tma"],
        ["_linear_kernel", "False", "wgmma", "no-tma"],
    ], proc.stdout
    assert all(int(ln[4]) <= 232448 for ln in lines)  # fits the 227 KB a program may have on sm_90


# ------------------------------------------------------------------ linear_add_layer_norm (split-K + LayerNorm)


def _ln_inputs(m, k, n, device="cpu"):
    x, w, b = _inputs(m, k, n, device)
    g = torch.Generator().manual_seed(m + 3 * k + 5 * n)
    r = torch.randn(m, n, generator=g, dtype=torch.float64).to(device) * 2.0
    lw = (1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(device)
    lb = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    return x, w, b, r, lw, lb


def _ln_oracle(x, w, b, r, lw, lb, eps):
    """LayerNorm(x W^T + b + r) through torch's own layer_norm in fp64 (an oracle outside our code)."""
    h = x.double() @ w.double().T + (0 if b is None else b.double()) + (0 if r is None else r.double())
    return torch.nn.functional.layer_norm(h, (h.shape[-1],), lw.double(), None if lb is None else lb.double(), eps)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize(("m", "k", "n", "splits"), [(37, 80, 48, 3), (5, 64, 40, 2), (20, 96, 33, 8), (9, 40, 24, 1)])
def test_split_k_add_layer_norm_matches_reference(dtype, tma, m, k, n, splits):
    """Split-K partials (ragged M, N, K; more splits than K blocks are clamped) summed in the LayerNorm kernel."""
    from trimformer.ops.linear.splitk import SplitKConfig

    ops = _ln_inputs(m, k, n)
    ref = _ln_oracle(*ops, 1e-5)
    lo = [t.to(dtype) for t in ops]
    cfg = SplitKConfig(16, 32, 16, 2, 4, 1, splits, tma=tma)
    out = linear_add_layer_norm(*lo, eps=1e-5, impl="triton", config=cfg)
    assert out.dtype == dtype and out.shape == (m, n)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    else:
        baseline = linear_add_layer_norm(*lo, eps=1e-5, impl="torch")  # plain PyTorch in fp16
        assert_close_budget(out, ref, baseline, factor=2.0, name=f"split-K {splits} tma={tma} {m}x{k}x{n}")


@pytest.mark.interpret
def test_split_k_partials_sum_to_the_product_and_optional_terms():
    from trimformer.ops.linear.splitk import SplitKConfig, linear_partials_fwd

    x, w, b, r, lw, lb = (t.float() for t in _ln_inputs(21, 100, 40))
    parts = linear_partials_fwd(x, w, SplitKConfig(16, 16, 16, 1, 4, 1, 4))
    assert parts.shape == (4, 21, 40) and parts.dtype == torch.float32
    torch.testing.assert_close(parts.double().sum(0), x.double() @ w.double().T, rtol=0, atol=1e-5)
    parts = linear_partials_fwd(x, w, SplitKConfig(16, 16, 64, 1, 4, 1, 5))  # 2 K blocks: at most 2 chunks
    assert parts.shape[0] == 2
    for bias, res, ln_b in ((None, r, lb), (b, None, lb), (b, r, None), (None, None, None)):
        out = linear_add_layer_norm(x, w, bias, res, lw, ln_b, eps=1e-12, impl="triton")
        torch.testing.assert_close(out.double(), _ln_oracle(x, w, bias, res, lw, ln_b, 1e-12), rtol=0, atol=2e-5)
    out = linear_add_layer_norm(x.view(3, 7, 100), w, b, r.view(3, 7, 40), lw, lb, eps=1e-12, impl="triton")
    assert out.shape == (3, 7, 40)
    torch.testing.assert_close(out.view(21, 40).double(), _ln_oracle(x, w, b, r, lw, lb, 1e-12), rtol=0, atol=2e-5)


def test_linear_add_layer_norm_torch_naive_autograd_and_validation():
    x, w, b, r, lw, lb = _ln_inputs(11, 24, 16)
    ref = _ln_oracle(x, w, b, r, lw, lb, 1e-6)
    torch.testing.assert_close(naive_linear_add_layer_norm(x, w, b, r, lw, lb, eps=1e-6), ref, rtol=0, atol=1e-12)
    r_before = r.clone()
    torch.testing.assert_close(linear_add_layer_norm(x, w, b, r, lw, lb, eps=1e-6), ref, rtol=0, atol=1e-12)
    assert torch.equal(r, r_before)  # the residual is never overwritten
    xg = x.clone().requires_grad_()
    linear_add_layer_norm(xg, w, b, r, lw, lb, eps=1e-6).square().sum().backward()  # CPU "auto": torch path
    xn = x.clone().requires_grad_()
    naive_linear_add_layer_norm(xn, w, b, r, lw, lb, eps=1e-6).square().sum().backward()
    torch.testing.assert_close(xg.grad, xn.grad, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="impl='triton' cannot run"):
        linear_add_layer_norm(x, w, b, r, lw, lb, eps=1e-6, impl="triton")  # CPU without the interpreter / fp64
    with pytest.raises(ValueError, match="residual must have shape"):
        linear_add_layer_norm(x, w, b, r[:, :8], lw, lb, eps=1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        linear_add_layer_norm(x, w[:, :8], b, r, lw, lb, eps=1e-6)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        linear_add_layer_norm(x, w, b, r, lw[:3], lb, eps=1e-6)
    with pytest.raises(ValueError, match="but x is"):
        linear_add_layer_norm(x, w.float(), b, r, lw, lb, eps=1e-6)
    with pytest.raises(ValueError, match="impl must be"):
        linear_add_layer_norm(x, w, b, r, lw, lb, eps=1e-6, impl="cuda")
    from trimformer.ops.linear.splitk import SplitKConfig

    with pytest.raises(ValueError, match="splits"):
        SplitKConfig(64, 64, 64, 8, 4, 3, 0)


def test_split_k_tuner_bookkeeping_on_cpu():
    from trimformer.ops.linear import tune
    from trimformer.ops.linear.splitk import MAX_SPLITS, SplitKConfig, default_split_k_config

    x, w, *_ = (t.half() for t in _ln_inputs(40, 64, 24))
    assert tune.choose_split_k(x, w, lambda choice, w: pytest.fail("no search off the GPU")) is None
    key = tune.tune_key(40, 24, 64, tune.ADD_LN, torch.float16, torch.device("cuda", 0))
    try:
        tune.set_choice(key, SplitKConfig(64, 64, 64, 8, 4, 4, 4))
        assert not tune.chose_triton(40, 24, 64, torch.float16)  # a split-K choice is no GEMM-epilogue choice
    finally:
        tune.clear()
    for m, k in ((1, 768), (300, 3072), (512, 768), (64, 64)):
        cands = tune.split_k_candidates(m, 768, k, torch.float16, 132)
        assert cands and len(set(cands)) == len(cands)
        assert all(c.splits * c.block_k <= max(k, c.block_k) for c in cands)  # no chunk is always empty
        d = default_split_k_config(m, 768, k, torch.float16, 132)
        assert 1 <= d.splits <= MAX_SPLITS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "auto"])
@pytest.mark.parametrize(("m", "k"), [(1, 3072), (272, 3072), (350, 768), (700, 3072)])
def test_linear_add_layer_norm_gpu(dtype, impl, m, k):
    """The BERT-base out-projection / FFN2 tails at B = 1 sizes (``"auto"`` tunes split-K vs cuBLAS + LayerNorm)
    and above the split-K row limit, against torch's fp64 layer_norm."""
    from trimformer.ops.linear import tune

    ops = _ln_inputs(m, k, 768, "cuda")
    ref = _ln_oracle(*ops, 1e-12)
    lo = [t.to(dtype) for t in ops]
    out = linear_add_layer_norm(*lo, eps=1e-12, impl=impl)
    assert_close_budget(out, ref, linear_add_layer_norm(*lo, eps=1e-12, impl="torch"), factor=2.0,
                        name=f"{impl} {dtype} M={m} K={k}")  # fmt: skip
    if impl == "auto" and 1 < m <= linear_api.SMALL_M:
        assert tune.lookup(tune.tune_key(m, 768, k, tune.ADD_LN, dtype, lo[0].device)) != "unknown"


@pytest.mark.gpu
def test_split_k_candidates_gpu():
    """Every split-K candidate the tuner may pick builds and is correct on the H100 shapes."""
    from trimformer.ops.linear.tune import split_k_candidates
    from trimformer.ops.triton_utils import num_sms

    ops = _ln_inputs(300, 3072, 768, "cuda")
    ref = _ln_oracle(*ops, 1e-12)
    lo = [t.half() for t in ops]
    baseline = linear_add_layer_norm(*lo, eps=1e-12, impl="torch")
    for cfg in split_k_candidates(300, 768, 3072, torch.float16, num_sms(lo[0].device)):
        out = linear_add_layer_norm(*lo, eps=1e-12, impl="triton", config=cfg)
        assert_close_budget(out, ref, baseline, factor=2.0, name=str(cfg))
