"""``linear`` (Triton GEMM with bias + activation epilogue, cuBLAS + fused kernel, PyTorch) vs the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from trimformer.ops.linear import api as linear_api
from trimformer.ops.linear import linear, naive_linear
from trimformer.testing import assert_close_budget

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


@pytest.mark.interpret
@pytest.mark.parametrize("persistent", [False, True])
def test_triton_gemm_explicit_configs(persistent):
    """Both kernels (one program per tile, persistent over tiles) with more tiles than programs and a ragged K."""
    from trimformer.ops.linear.gemm import GemmConfig, linear_fwd

    x, w, b = (t.float() for t in _inputs(70, 40, 50))
    cfg = GemmConfig(16, 16, 16, 2, 4, 1, persistent=persistent)  # 5 x 4 tiles on the interpreter's 4 "SMs"
    out = linear_fwd(x, w, b, "gelu_erf", config=cfg)
    torch.testing.assert_close(out, naive_linear(x, w, b, "gelu").float(), rtol=0, atol=5e-5)


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


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("shape", [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4)])
def test_linear_gpu_configs(persistent, shape):
    from trimformer.ops.linear.gemm import GemmConfig, linear_fwd

    cfg = GemmConfig(*shape, persistent=persistent)
    for m, k, n, act in ((1000, 768, 3072, "gelu"), (333, 3072, 768, None)):
        x, w, b = _inputs(m, k, n, "cuda")
        lo = [t.half() for t in (x, w, b)]
        out = linear_fwd(*lo, "gelu_erf" if act else "identity", config=cfg)
        assert_close_budget(out, naive_linear(x, w, b, act), naive_linear(*lo, act), factor=2.0, name=str(cfg))


def test_tuner_bookkeeping_on_cpu():
    from trimformer.ops.linear import tune
    from trimformer.ops.linear.gemm import GemmConfig

    x, w, b = (t.float() for t in _inputs(40, 32, 24))
    calls = []
    assert tune.choose(x, w, b, "gelu_erf", lambda: calls.append(1)) is None  # no search off the GPU
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


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n", "act"), [(300, 768, 3072, "gelu"), (4864, 768, 3072, "gelu")])
def test_tuned_auto_linear_gpu(m, k, n, act):
    from trimformer.ops.linear import tune

    tune.clear()
    _check(m, k, n, act, torch.float16, "cuda", "auto")  # searches, then runs the chosen path
    (times,) = tune.MEASURED.values()
    assert "cublas" in times and len(times) >= 2
    _check(m, k, n, act, torch.float16, "cuda", "auto")  # the remembered choice
    assert len(tune.MEASURED) == 1
