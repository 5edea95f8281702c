"""Linear layer with a fused bias + activation epilogue (Triton GEMM or cuBLAS + one fused kernel)."""

from trimformer.ops.linear.api import linear
from trimformer.ops.linear.naive import naive_linear

__all__ = ["linear", "naive_linear"]
