"""Embeddings of a packed batch: word + token type + position, LayerNorm, and ALBERT's factorized projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trimformer.models.encoders.config import EncoderConfig
from trimformer.ops.norm import add_layer_norm


class EncoderEmbeddings(nn.Module):
    """``LayerNorm(word[ids] + token_type[types] + position[pos])``, then ``project`` for ALBERT.

    Parameters: ``word.weight`` ``[V, E]``, ``position.weight`` ``[P, E]``, ``token_type.weight`` ``[TV, E]`` (absent
    when ``type_vocab_size == 0``), ``norm.weight/bias`` ``[E]``, ``project.weight`` ``[H, E]`` / ``project.bias``
    ``[H]`` (ALBERT only).
    """

    def __init__(
        self,
        config: EncoderConfig,
        *,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        e = config.embedding_size
        self.impl = impl
        self.eps = config.layer_norm_eps
        self.word = nn.Embedding(config.vocab_size, e, **kw)
        self.position = nn.Embedding(config.max_position_embeddings, e, **kw)
        self.token_type = nn.Embedding(config.type_vocab_size, e, **kw) if config.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(e, eps=config.layer_norm_eps, **kw)
        self.project = nn.Linear(e, config.hidden_size, **kw) if config.embedding_projection else None

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed packed tokens.

        Args:
            input_ids: ``[T]`` int64.
            position_ids: ``[T]`` int64 (already offset for RoBERTa-family models).
            token_type_ids: ``[T]`` int64, or ``None`` for segment 0 everywhere. Ignored when the model has no
                token-type table (DistilBERT).

        Returns:
            ``[T, H]`` in the parameters' dtype.
        """
        x = F.embedding(input_ids, self.word.weight)
        pos = F.embedding(position_ids, self.position.weight)
        type_bias = None
        if self.token_type is not None:
            if token_type_ids is None:
                type_bias = self.token_type.weight[0]  # HF's default all-zero segment, as a broadcast bias
            else:
                x = x + F.embedding(token_type_ids, self.token_type.weight)
        h = add_layer_norm(
            x, pos, self.norm.weight, self.norm.bias, eps=self.eps, x_bias=type_bias, inplace=True, impl=self.impl
        )
        if self.project is not None:
            h = F.linear(h, self.project.weight, self.project.bias)
        return h
