"""Disentangled attention (DeBERTa-v2/v3) over packed variable-length sequences."""

from trimformer.ops.disentangled.api import disentangled_attention
from trimformer.ops.disentangled.naive import log_bucket_position, naive_disentangled_attention, relative_positions

__all__ = ["disentangled_attention", "log_bucket_position", "naive_disentangled_attention", "relative_positions"]
