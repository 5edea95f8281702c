"""The warp-specialised Hopper GEMM (``ops/linear/gemm_ws.py``, Gluon): sm_90 compile checks on the CPU, numerics and
the tuner on the GPU (Gluon kernels have no CPU interpreter)."""

from __future__ import annotations

import pytest
import torch

from trimformer.ops.linear import naive_linear
from trimformer.testing import assert_close_budget
from trimformer.testing.sm90 import compile_for_sm90, has_nvidia_backend

pytest.importorskip("triton")
gemm_ws = pytest.importorskip("trimformer.ops.linear.gemm_ws", reason="this Triton build has no Gluon")


def _inputs(m, k, n, device):
    g = torch.Generator().manual_seed(m * 31 + k * 7 + n)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(device), w.to(device), b.to(device)


def test_config_validation_and_cpu_errors():
    W = gemm_ws.WsGemmConfig
    assert W().smem_bytes() == (3 * (256 + 128) * 64 + 256 * 128) * 2
    for bad in (dict(block_m=64), dict(block_n=256), dict(block_k=16), dict(stages=1), dict(group_m=0),
                dict(stages=4)):  # fmt: skip  # 4 stages of 256 x 128 x 64 + the hand-over buffer: 256 KB > 227 KB
        with pytest.raises(ValueError):
            W(**bad)
    x, w, b = (t.half() for t in _inputs(64, 32, 16, "cpu"))
    reason = gemm_ws.ws_reason(x, w, "gelu_erf")
    assert reason is not None and "sm_90" in reason
    from trimformer.ops.linear.gemm import linear_fwd

    with pytest.raises(ValueError, match="warp-specialised"):
        linear_fwd(x, w, b, "gelu_erf", config=W())


_SM90_COMPILE = r"""
import trimformer.ops.linear.gemm_ws as ws
ws.num_sms = tu.num_sms
torch.Tensor.is_cuda = property(lambda self: True)
for dt, kind, cfg in ((torch.float16, "gelu_erf", ws.WsGemmConfig()), (torch.bfloat16, "identity",
                      ws.WsGemmConfig(128, 64, 64, 5))):
    x, w, b = torch.randn(4772, 768).to(dt), torch.randn(3072, 768).to(dt), torch.randn(3072).to(dt)
    ws.ws_linear_fwd(x, w, b, kind, config=cfg)
    name, k = kernels[-1]
    ptx = k.asm["ptx"]
    print(name, "wgmma" if "wgmma.mma_async" in ptx else "no-wgmma", "tma" if "cp.async.bulk.tensor" in ptx
          else "no-tma", "setmaxnreg" if "setmaxnreg" in ptx else "no-setmaxnreg", "local" if ".local" in ptx
          else "no-local", k.metadata.shared)
"""


@pytest.mark.slow
def test_ws_kernel_compiles_for_sm90():
    """Both tile shapes compile for sm_90 with wgmma, TMA bulk copies and per-partition register budgets, without
    local memory, within the 227 KB of shared memory a program may have."""
    if not has_nvidia_backend():
        pytest.skip("this Triton build has no NVIDIA backend (compiler and ptxas) to compile sm_90 kernels with")
    proc = compile_for_sm90(_SM90_COMPILE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert [ln[:5] for ln in lines] == [["_ws_linear_kernel", "wgmma", "tma", "setmaxnreg", "no-local"]] * 2
    assert all(int(ln[5]) <= 232448 for ln in lines), proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "k", "n", "act", "with_bias"),
    [(4772, 768, 3072, "gelu", True), (1000, 3072, 768, None, True), (1029, 200, 333, "gelu_new", False),
     (3000, 768, 2304, None, False), (129, 64, 8, "gelu", True)],
)  # fmt: skip
@pytest.mark.parametrize("cfg", [(256, 128, 64, 3), (256, 64, 64, 4), (128, 128, 32, 5)], ids=str)
def test_ws_gemm_gpu(dtype, m, k, n, act, with_bias, cfg):
    from trimformer.ops.activation import canonical_activation
    from trimformer.ops.linear.gemm import linear_fwd

    x, w, b = _inputs(m, k, n, "cuda")
    b = b if with_bias else None
    lo = [None if t is None else t.to(dtype) for t in (x, w, b)]
    kind = "identity" if act is None else canonical_activation(act)
    out = linear_fwd(*lo, kind, config=gemm_ws.WsGemmConfig(*cfg))
    assert out.shape == (m, n) and out.dtype == dtype
    name = f"ws {cfg} {act} {dtype} {m}x{k}x{n}"
    assert_close_budget(out, naive_linear(x, w, b, act), naive_linear(*lo, act), factor=2.0, name=name)


@pytest.mark.gpu
def test_ws_gemm_gpu_graph_and_leading_dims():
    """Replays from a CUDA graph give the eager result; ``[..., K]`` inputs keep their leading dims."""
    x, w, b = (t.to(torch.float16) for t in _inputs(2 * 1500, 768, 3072, "cuda"))
    x3 = x.view(2, 1500, 768)
    cfg = gemm_ws.WsGemmConfig()
    eager = gemm_ws.ws_linear_fwd(x3, w, b, "gelu_erf", config=cfg)
    assert eager.shape == (2, 1500, 3072)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gemm_ws.ws_linear_fwd(x3, w, b, "gelu_erf", config=cfg)
        with torch.cuda.graph(graph):
            out = gemm_ws.ws_linear_fwd(x3, w, b, "gelu_erf", config=cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
