"""The padding-free encoder: embeddings once on packed tokens, every layer on ``[T, H]``, padding only on request."""

from __future__ import annotations

import torch
from torch import nn

from trimformer.layers.encoder import EncoderLayer
from trimformer.models.encoders.config import EncoderConfig
from trimformer.models.encoders.embeddings import EncoderEmbeddings
from trimformer.ops.varlen import PackedBatch, pad


class PackedEncoder(nn.Module):
    """Shared entry points of the padding-free encoders: subclasses set ``config`` (with ``max_length``,
    ``max_position_embeddings``, ``model_type``, ``position_offset``, and optionally ``max_input_length``: the
    longest sequence the forward accepts, ``None`` for no limit, default ``max_length``) and ``embeddings.word`` and
    implement :meth:`encode` on raw packed tensors."""

    config: object

    def set_impl(self, impl: str) -> None:
        """Switch the op implementation (``"auto"``, ``"torch"``, ``"naive"``, ``"triton"``) of every submodule that
        has one (embeddings, layers, and the family's extra parts)."""
        self.impl = impl
        for module in self.modules():
            if module is not self and hasattr(module, "impl"):
                module.impl = impl

    def forward_packed(self, batch: PackedBatch) -> torch.Tensor:
        """Encode a packed batch.

        Args:
            batch: packed ids and metadata (moved to the model's device if needed; its ``position_ids`` must carry
                ``config.position_offset``).

        Returns:
            ``[T, H]`` last hidden states of the valid tokens, in the model's dtype.
        """
        cfg = self.config
        limit = getattr(cfg, "max_input_length", cfg.max_length)
        if limit is not None and batch.max_seqlen > limit:
            raise ValueError(
                f"a sequence has {batch.max_seqlen} tokens but this {cfg.model_type} model takes at most "
                f"{limit} (max_position_embeddings {cfg.max_position_embeddings})"
            )
        b = batch.to(self.embeddings.word.weight.device)
        return self.encode(b.input_ids, b.position_ids, b.token_type_ids, b.cu_seqlens, b.max_seqlen)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Padded in, padded out (a drop-in for HF's ``last_hidden_state``), packed in between.

        Args:
            input_ids: ``[B, S]`` token ids.
            attention_mask: ``[B, S]`` 0/1, right or left padding.
            token_type_ids: optional ``[B, S]``.

        Returns:
            ``[B, S, H]`` with zeros at padding. Positions restart at each sequence's first valid token, so a
            left-padded sequence gives the same result as alone.
        """
        batch = PackedBatch.from_padded(
            input_ids, attention_mask, token_type_ids, position_offset=self.config.position_offset
        )
        return pad(self.forward_packed(batch), batch)


class EncoderModel(PackedEncoder):
    """A BERT-family encoder (BERT, RoBERTa, XLM-R, DistilBERT, ALBERT) that never computes on padding.

    Parameters live in ``embeddings`` (:class:`EncoderEmbeddings`) and ``layers`` (``config.num_unique_layers``
    :class:`~trimformer.layers.EncoderLayer`); ``config.layer_schedule`` says which layer runs at each step (ALBERT
    shares layers). Build it with :func:`trimformer.models.encoders.load_encoder` to get HF weights.

    Args:
        config: the parsed configuration.
        impl: op implementation for every layer (``"auto"``, ``"torch"``, ``"naive"``, ``"triton"``).
        device, dtype: of the (uninitialised) parameters; ``device="meta"`` builds a shell to load weights into.
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
        self.config = config
        self.embeddings = EncoderEmbeddings(config, impl=impl, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            EncoderLayer(
                config.hidden_size,
                config.num_heads,
                config.intermediate_size,
                config.activation,
                config.layer_norm_eps,
                impl=impl,
                device=device,
                dtype=dtype,
            )
            for _ in range(config.num_unique_layers)
        )
        self.schedule = config.layer_schedule

    def encode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """The forward on raw packed tensors (what CUDA graphs capture): no validation, no host reads.

        Args:
            input_ids, position_ids: ``[T]`` int64 on the model's device; token_type_ids: ``[T]`` or ``None``.
            cu_seqlens: ``[N + 1]`` int32; max_seqlen: an upper bound on every sequence's length (host int).

        Returns:
            ``[T, H]`` last hidden states.
        """
        h = self.embeddings(input_ids, position_ids, token_type_ids)
        for index in self.schedule:
            h = self.layers[index](h, cu_seqlens, max_seqlen)
        return h
