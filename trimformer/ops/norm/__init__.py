"""Normalisation ops: fused (bias +) residual + LayerNorm."""

from trimformer.ops.norm.api import add_layer_norm
from trimformer.ops.norm.naive import naive_add_layer_norm

__all__ = ["add_layer_norm", "naive_add_layer_norm"]
