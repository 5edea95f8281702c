"""Parameter, KV-cache and FLOP accounting for whole :class:`TrimformerConfig` models, and parameter matching.

Parameter matching (``cca-spec.md`` section 5: comparisons are parameter-matched): attention kinds differ in
parameters, so :func:`param_matched_config` moves the difference into the SwiGLU width ``intermediate_size`` (in
steps of ``multiple``) until the total is as close as possible to a target.
"""

from __future__ import annotations

import copy

from trimformer.layers.accounting import attention_params, forward_flops, kv_cache_bytes_per_token
from trimformer.models.lm.configuration import TrimformerConfig


def _mlp_params(config: TrimformerConfig) -> int:
    return 3 * config.hidden_size * config.intermediate_size


def model_params(config: TrimformerConfig, *, embeddings: bool = True) -> int:
    """Exact parameter count of ``TrimformerForCausalLM(config)`` (``embeddings=False``: without the input embedding
    and LM head, the "non-embedding" count)."""
    e, layers = config.hidden_size, config.num_hidden_layers
    per_layer = attention_params(config.attention_config) + _mlp_params(config) + 2 * e
    n = layers * per_layer + e
    if embeddings:
        n += config.vocab_size * e * (1 if config.tie_word_embeddings else 2)
    return n


def kv_bytes_per_token(config: TrimformerConfig, dtype: str = "bf16") -> int:
    """Decode-cache bytes per token for the whole model (all layers) in ``dtype``."""
    return config.num_hidden_layers * kv_cache_bytes_per_token(config.attention_config, dtype)


def train_flops_per_token(config: TrimformerConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) at context ``seq_len`` with causal attention.

    Forward: ``2 x`` multiply-adds of every matmul and convolution (attention projections per
    :func:`trimformer.layers.accounting.forward_flops`, SwiGLU, LM head) plus the causal half of the ``S x S``
    attention scores. The embedding lookup and elementwise work are not counted.
    """
    a = config.attention_config
    if a.kind == "mla":
        width = a.num_heads * (a.head_dim + a.rope_head_dim) + a.num_heads * a.head_dim
    else:
        width = 2 * a.q_width
    attn = forward_flops(a, seq_len) / seq_len - seq_len * width  # full S^2 scores counted once -> causal half
    per_layer = attn + 2 * _mlp_params(config)
    forward = config.num_hidden_layers * per_layer + 2 * config.vocab_size * config.hidden_size
    return 3.0 * forward


def param_matched_config(config: TrimformerConfig, target_params: int, *, multiple: int = 8) -> TrimformerConfig:
    """A copy of ``config`` whose ``intermediate_size`` (a multiple of ``multiple``) brings the total parameter count
    closest to ``target_params``.

    Raises:
        ValueError: when even the smallest MLP overshoots the target.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    out = copy.deepcopy(config)
    out.intermediate_size = multiple
    step = 3 * config.hidden_size * config.num_hidden_layers * multiple
    fixed = model_params(out) - step
    if fixed + step > target_params:
        raise ValueError(f"the attention and embeddings alone take {fixed + step} parameters > target {target_params}")
    out.intermediate_size = max(1, round((target_params - fixed) / step)) * multiple
    return out
