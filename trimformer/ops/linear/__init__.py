"""Linear layer with a fused bias + activation epilogue (Triton GEMM or cuBLAS + one fused kernel), and the GEMM +
bias + residual + LayerNorm tail of a post-LN layer (``linear_add_layer_norm``, split-K reduced in the LayerNorm)."""

from trimformer.ops.linear.add_norm import linear_add_layer_norm
from trimformer.ops.linear.api import linear
from trimformer.ops.linear.naive import naive_linear, naive_linear_add_layer_norm

__all__ = ["linear", "linear_add_layer_norm", "naive_linear", "naive_linear_add_layer_norm"]
