"""The encoder engine: tokenization, token-budget packing, pooling and the public :class:`Encoder`."""

from trimformer.engine.batching import plan_batches
from trimformer.engine.encoder import DEFAULT_BATCH_TOKENS, Encoder, default_model_path
from trimformer.engine.pooling import POOLING_MODES, pool
from trimformer.engine.st_config import SentenceTransformerSettings, read_st_settings
from trimformer.engine.tokenization import Tokenized

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "POOLING_MODES",
    "Encoder",
    "SentenceTransformerSettings",
    "Tokenized",
    "default_model_path",
    "plan_batches",
    "pool",
    "read_st_settings",
]
