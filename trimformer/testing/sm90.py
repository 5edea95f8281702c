"""Compile (never launch) Triton kernels for sm_90 on a machine without a GPU, for tests.

The Triton CPU interpreter runs code that the GPU compiler rejects (e.g. a runtime ``if``/``else`` that binds one name
to tiles of two shapes) and cannot show what the compiled kernel uses (wgmma, bulk tensor copies, shared memory). A
test passes a script body to :func:`compile_for_sm90`; it runs in a subprocess with ``TRITON_INTERPRET=0`` after
:data:`SM90_PRELUDE`, which installs a stand-in driver reporting an sm_90 device and turns every kernel launch into a
compile-only warm-up, appending ``(kernel name, compiled kernel)`` to the list ``kernels`` (``compiled.asm["ptx"]``,
``compiled.metadata.shared``, ...). Operands are CPU tensors: nothing is read or written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SM90_PRELUDE = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
import triton.runtime.jit as J

class StandInDriver:
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_active_torch_device(self): return torch.device("cpu")

driver.set_active(StandInDriver())
kernels = []
_run = J.JITFunction.run
def run(self, *args, grid, warmup, **kwargs):
    kernels.append((self.fn.__name__, _run(self, *args, grid=grid, warmup=True, **kwargs)))
J.JITFunction.run = run
import trimformer.ops.triton_utils as tu
tu.num_sms = lambda device: 132
"""


def has_nvidia_backend() -> bool:
    """Whether this Triton build ships the NVIDIA backend (compiler passes and ptxas) needed to compile for sm_90."""
    from triton.backends import backends

    return "nvidia" in backends


def compile_for_sm90(body: str, *, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Run :data:`SM90_PRELUDE` + ``body`` in a fresh Python with ``TRITON_INTERPRET=0``, the repository on the path.

    Args:
        body: Python source that imports the kernels' launchers and calls them on CPU tensors; modules that bound
            ``num_sms`` at import should be pointed at ``tu.num_sms``.
        timeout: seconds before the subprocess is killed.

    Returns:
        The finished process (stdout/stderr captured as text).
    """
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", SM90_PRELUDE + body], env=env, capture_output=True, text=True, timeout=timeout, cwd=root
    )


__all__ = ["SM90_PRELUDE", "compile_for_sm90", "has_nvidia_backend"]
