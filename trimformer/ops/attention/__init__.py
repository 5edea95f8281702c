"""Attention ops over packed (varlen) sequences and key/value caches."""

from trimformer.ops.attention.api import kvcache_attention, varlen_attention
from trimformer.ops.attention.naive import naive_attention, naive_kvcache_attention, naive_varlen_attention

__all__ = [
    "kvcache_attention",
    "naive_attention",
    "naive_kvcache_attention",
    "naive_varlen_attention",
    "varlen_attention",
]
