"""Shared test setup.

``TRITON_INTERPRET`` must be decided before any ``@triton.jit`` runs: ``make test`` exports it, and this
file sets it for a bare ``pytest`` too (a GPU run exports TRITON_INTERPRET=0 first).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under pytest-xdist every worker would otherwise start one intra-op thread per core, and the workers fight for
# the same cores (measured: 182 s vs 8 s for the LM tests on 2 cores). One thread per worker is fastest.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests, also outside xdist (in-process references next to subprocesses or
    servers on a 2-core machine); restores the previous count. Use with ``pytest.mark.usefixtures``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none is visible to torch on this machine")
    no_interp = pytest.mark.skip(
        reason="Triton CPU-interpreter test: needs TRITON_INTERPRET=1 (the GPU run covers these kernels natively)"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(no_gpu)
        if "interpret" in item.keywords and not INTERPRETING:
            item.add_marker(no_interp)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
