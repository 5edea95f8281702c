"""nn.Modules composed from ops."""

from trimformer.layers.baselines import GroupedQueryAttention, MultiHeadLatentAttention, build_attention
from trimformer.layers.cache import AttentionCache, CCACacheLayer, KVCacheLayer, MLACacheLayer
from trimformer.layers.cca import AttentionBase, AttentionConfig, CCAttention
from trimformer.layers.encoder import EncoderLayer

__all__ = [
    "AttentionBase",
    "AttentionCache",
    "AttentionConfig",
    "CCACacheLayer",
    "CCAttention",
    "EncoderLayer",
    "GroupedQueryAttention",
    "KVCacheLayer",
    "MLACacheLayer",
    "MultiHeadLatentAttention",
    "build_attention",
]
