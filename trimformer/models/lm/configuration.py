"""``TrimformerConfig``: an HF ``PretrainedConfig`` for the Llama-style causal LM with a pluggable attention layer.

The attention layer is described by a nested :class:`~trimformer.layers.cca.AttentionConfig` stored as a plain dict
under ``attention`` (so ``config.json`` stays JSON); its ``hidden_size`` always equals the model's.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from trimformer.layers.cca import LAYER_IMPLS, AttentionConfig


class TrimformerConfig(PretrainedConfig):
    """Configuration of :class:`~trimformer.models.lm.TrimformerForCausalLM`.

    Args:
        vocab_size: rows of the embedding / columns of the LM head.
        hidden_size: residual width ``E``.
        intermediate_size: SwiGLU hidden width.
        num_hidden_layers: decoder layers.
        attention: the attention layer, an :class:`AttentionConfig` or its dict (``hidden_size`` may be omitted; it is
            set to ``hidden_size`` and must agree when given). Default: CCGQA with 8 query / 2 kv latent heads of
            ``hidden_size // 16`` (the paper's CCGQA 2x/8x at 16 MHA heads).
        rms_norm_eps: epsilon of every RMSNorm.
        initializer_range: std of the normal initialisation of linear and embedding weights (also used for the
            attention projections).
        tie_word_embeddings: share the embedding matrix with the LM head.
        attn_impl: ``"auto"``, ``"triton"``, ``"torch"`` or ``"naive"`` for the attention layers (not saved as a model
            property in the weights; it only selects kernels).
        use_cache: default of ``use_cache`` in ``generate``.
        bos_token_id, eos_token_id, pad_token_id: special token ids (the byte tokenizer's are 256, 257, 258).
    """

    model_type = "trimformer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 320,
        hidden_size: int = 512,
        intermediate_size: int = 1408,
        num_hidden_layers: int = 8,
        attention: AttentionConfig | dict[str, Any] | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        attn_impl: str = "auto",
        use_cache: bool = True,
        bos_token_id: int | None = 256,
        eos_token_id: int | None = 257,
        pad_token_id: int | None = 258,
        **kwargs,
    ) -> None:
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not rms_norm_eps > 0 or not initializer_range > 0:
            raise ValueError(f"rms_norm_eps and initializer_range must be positive, got {rms_norm_eps}, "
                             f"{initializer_range}")  # fmt: skip
        if attn_impl not in LAYER_IMPLS:
            raise ValueError(f"attn_impl must be one of {LAYER_IMPLS}, got {attn_impl!r}")
        specials = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        for name, tok in specials.items():
            if tok is not None and not (isinstance(tok, int) and 0 <= tok < vocab_size):
                raise ValueError(f"{name} must be None or in [0, vocab_size={vocab_size}), got {tok!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = float(rms_norm_eps)
        self.initializer_range = float(initializer_range)
        self.attn_impl = attn_impl
        self.use_cache = use_cache
        self.attention = self._attention_dict(attention, hidden_size, self.initializer_range).to_dict()
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @staticmethod
    def _attention_dict(attention, hidden_size: int, initializer_range: float) -> AttentionConfig:
        if attention is None:
            d = max(hidden_size // 16, 2)
            attention = {"kind": "ccgqa", "num_heads": 8, "num_kv_heads": 2, "head_dim": d}
        if isinstance(attention, AttentionConfig):
            attention = attention.to_dict()
        if not isinstance(attention, dict):
            raise ValueError(f"attention must be an AttentionConfig or a dict, got {type(attention).__name__}")
        attention = dict(attention)
        attention.setdefault("init_std", initializer_range)
        given = attention.setdefault("hidden_size", hidden_size)
        if given != hidden_size:
            raise ValueError(f"attention.hidden_size ({given}) must equal hidden_size ({hidden_size})")
        return AttentionConfig.from_dict(attention)

    @property
    def attention_config(self) -> AttentionConfig:
        """The attention layer's :class:`AttentionConfig` (validated; a fresh object per call)."""
        return AttentionConfig.from_dict(self.attention)
