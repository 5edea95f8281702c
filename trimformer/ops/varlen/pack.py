"""Packed (padding-free) batch metadata and the pad/unpad helpers for hidden states.

A :class:`PackedBatch` holds everything a padding-free encoder needs for one batch, built once on the host:

* ``input_ids`` ``[T]``: the valid tokens of every sequence, concatenated (no padding anywhere);
* ``cu_seqlens`` ``[N + 1]`` int32: sequence ``i`` owns packed rows ``cu_seqlens[i] : cu_seqlens[i + 1]``;
* ``max_seqlen``: the longest sequence as a host ``int`` (never read back from a device);
* ``position_ids`` ``[T]``: restart at every sequence, plus ``position_offset`` (``padding_idx + 1`` for the
  RoBERTa family, ``0`` for BERT), whatever padding the caller's layout had;
* ``token_type_ids`` ``[T]`` or ``None``;
* the padded layout it came from (``row_starts``, ``padded_len``) and ``indices`` ``[T]``, the row of each packed
  token in the flattened ``[N * S]`` padded layout, so :func:`pad` / :func:`unpad` are one gather / scatter.

The same ``cu_seqlens`` tensor object must be passed to every layer of a forward: the CPU attention path caches
its bucket plan on that object.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """Metadata of one packed batch of ``N`` sequences with ``T`` valid tokens in total.

    Attributes:
        input_ids: ``[T]`` int64 token ids, sequences back to back.
        cu_seqlens: ``[N + 1]`` int32 cumulative lengths, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        max_seqlen: longest sequence length (host ``int``; 0 for an empty batch).
        position_ids: ``[T]`` int64, ``position_offset + (0, 1, ..., L_i - 1)`` for each sequence.
        token_type_ids: ``[T]`` int64 segment ids, or ``None`` (the model then uses segment 0).
        seqlens: host tuple of the ``N`` lengths.
        row_starts: host tuple, where sequence ``i`` starts inside its padded row (``0`` for right padding,
            ``S - L_i`` for left padding).
        padded_len: ``S``, the padded row length of the layout this batch maps to.
        indices: ``[T]`` int64, flat row of each packed token in the ``[N * S]`` padded layout.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    token_type_ids: torch.Tensor | None
    seqlens: tuple[int, ...]
    row_starts: tuple[int, ...]
    padded_len: int
    indices: torch.Tensor

    @property
    def num_seqs(self) -> int:
        """``N``, the number of sequences."""
        return len(self.seqlens)

    @property
    def num_tokens(self) -> int:
        """``T``, the number of valid tokens (host int)."""
        return int(self.input_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str, *, non_blocking: bool = True) -> PackedBatch:
        """The same batch with its tensors on ``device`` (host metadata unchanged; no-op when already there).

        Host-to-GPU copies go through pinned memory and are asynchronous by default, so packing the next batch on
        the host overlaps with the GPU still running this one.
        """
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        pin = non_blocking and device.type == "cuda" and self.input_ids.device.type == "cpu"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return (t.pin_memory() if pin else t).to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            position_ids=move(self.position_ids),
            token_type_ids=move(self.token_type_ids),
            seqlens=self.seqlens,
            row_starts=self.row_starts,
            padded_len=self.padded_len,
            indices=move(self.indices),
        )

    @classmethod
    def from_token_lists(
        cls,
        token_lists: Sequence[Sequence[int]],
        token_type_lists: Sequence[Sequence[int]] | None = None,
        *,
        position_offset: int = 0,
        device: torch.device | str | None = None,
    ) -> PackedBatch:
        """Pack ``N`` token-id lists (no padding anywhere); the padded layout is right padding to ``max_seqlen``.

        Args:
            token_lists: ``N`` sequences of token ids (each may be empty).
            token_type_lists: optional segment ids, same lengths as ``token_lists``.
            position_offset: added to every position id (``padding_idx + 1`` for RoBERTa-family models).
            device: where the tensors go (default CPU). Everything is computed on the host first.
        """
        seqlens = tuple(len(t) for t in token_lists)
        if token_type_lists is not None:
            if len(token_type_lists) != len(seqlens):
                raise ValueError(
                    f"token_type_lists has {len(token_type_lists)} sequences but token_lists has {len(seqlens)}"
                )
            for i, (ids, types) in enumerate(zip(token_lists, token_type_lists)):
                if len(ids) != len(types):
                    raise ValueError(f"sequence {i}: {len(ids)} token ids but {len(types)} token type ids")
        input_ids = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
        token_type_ids = (
            None
            if token_type_lists is None
            else torch.tensor(list(itertools.chain.from_iterable(token_type_lists)), dtype=torch.long)
        )
        max_seqlen = max(seqlens, default=0)
        cu, position_ids, indices = _host_metadata(seqlens, (0,) * len(seqlens), max_seqlen, position_offset)
        batch = cls(
            input_ids=input_ids,
            cu_seqlens=cu,
            max_seqlen=max_seqlen,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            seqlens=seqlens,
            row_starts=(0,) * len(seqlens),
            padded_len=max_seqlen,
            indices=indices,
        )
        return batch if device is None else batch.to(device)

    @classmethod
    def from_padded(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        *,
        position_offset: int = 0,
    ) -> PackedBatch:
        """Pack a padded batch: keep the tokens where ``attention_mask`` is 1 (right or left padding).

        The mask is read on the host once (one device-to-host copy when the inputs live on a GPU); the packed
        tensors are gathered on the inputs' device. Position ids restart at every sequence, so a left-padded
        sequence gets the same positions as the same sequence right-padded or alone.

        Args:
            input_ids: ``[B, S]`` integer token ids.
            attention_mask: ``[B, S]`` of 0/1 (any integer, bool or float dtype); the ones of each row must be
                contiguous (right padding, left padding, or both).
            token_type_ids: optional ``[B, S]`` segment ids.
            position_offset: added to every position id.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"token_type_ids shape {tuple(token_type_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        mask_host = attention_mask.detach().to("cpu")
        if not ((mask_host == 0) | (mask_host == 1)).all():
            raise ValueError("attention_mask must contain only 0 and 1")
        mask_host = mask_host.bool()
        b, s = mask_host.shape
        lens = mask_host.sum(1)
        first = torch.where(lens > 0, mask_host.to(torch.uint8).argmax(1), torch.zeros_like(lens))
        last = torch.where(lens > 0, s - 1 - mask_host.flip(1).to(torch.uint8).argmax(1), first - 1)
        holes = (last - first + 1) != lens
        if holes.any():
            row = int(holes.nonzero()[0, 0])
            raise ValueError(
                f"attention_mask row {row} has gaps: the ones of a row must be contiguous (right or left padding)"
            )
        seqlens = tuple(lens.tolist())
        row_starts = tuple(first.tolist())
        dev = input_ids.device
        cu, position_ids, _ = _host_metadata(seqlens, row_starts, s, position_offset)
        flat_idx = mask_host.reshape(-1).nonzero().squeeze(1).to(dev)
        packed_types = None
        if token_type_ids is not None:
            packed_types = token_type_ids.reshape(-1).index_select(0, flat_idx).long()
        return cls(
            input_ids=input_ids.reshape(-1).index_select(0, flat_idx).long(),
            cu_seqlens=cu.to(dev),
            max_seqlen=max(seqlens, default=0),
            position_ids=position_ids.to(dev),
            token_type_ids=packed_types,
            seqlens=seqlens,
            row_starts=row_starts,
            padded_len=s,
            indices=flat_idx,
        )


def _host_metadata(
    seqlens: tuple[int, ...], row_starts: tuple[int, ...], padded_len: int, position_offset: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cu_seqlens [N + 1] int32, position_ids [T] int64, indices [T] int64)`` computed on the CPU."""
    n = len(seqlens)
    lens = torch.tensor(seqlens, dtype=torch.long)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    if n:
        torch.cumsum(lens, 0, out=cu[1:])
    total = sum(seqlens)
    seq_of_token = torch.repeat_interleave(torch.arange(n), lens, output_size=total)
    local = torch.arange(total) - cu[:-1].long()[seq_of_token]  # position inside the sequence
    row_base = seq_of_token * padded_len + torch.tensor(row_starts, dtype=torch.long)[seq_of_token]
    return cu, local + position_offset, row_base + local


def check_varlen_metadata(cu_seqlens: torch.Tensor, max_seqlen: object, device: torch.device) -> None:
    """Validate the metadata a varlen kernel takes with tokens on ``device``.

    Raises:
        ValueError: ``cu_seqlens`` is not a 1-D int32 ``[N + 1]`` (``N >= 1``) tensor on ``device``, or ``max_seqlen``
            is not a non-negative Python int (a tensor would force a host sync).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor with N + 1 >= 2 entries, got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on {device} like q, got {cu_seqlens.device}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative Python int, got {max_seqlen!r}")


def unpad(padded: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Gather the valid rows of a padded tensor.

    Args:
        padded: ``[N, S, ...]`` laid out as ``batch`` describes (``N == batch.num_seqs``, ``S == batch.padded_len``).
        batch: the packed batch metadata.

    Returns:
        ``[T, ...]``, the valid rows in packed order (same dtype and device).
    """
    if padded.dim() < 2 or padded.shape[0] != batch.num_seqs or padded.shape[1] != batch.padded_len:
        raise ValueError(
            f"padded tensor has shape {tuple(padded.shape)}; the batch needs "
            f"[{batch.num_seqs}, {batch.padded_len}, ...]"
        )
    n, s = padded.shape[0], padded.shape[1]
    return padded.reshape(n * s, *padded.shape[2:]).index_select(0, batch.indices)


def pad(packed: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Scatter packed rows back into the padded layout of ``batch``, zeros at padding.

    Args:
        packed: ``[T, ...]`` (``T == batch.num_tokens``).
        batch: the packed batch metadata.

    Returns:
        ``[N, S, ...]`` with ``S == batch.padded_len``; padding rows are zero.
    """
    if packed.shape[0] != batch.num_tokens:
        raise ValueError(f"packed tensor has {packed.shape[0]} rows but the batch has {batch.num_tokens} tokens")
    n, s = batch.num_seqs, batch.padded_len
    out = packed.new_zeros(n * s, *packed.shape[1:])
    out.index_copy_(0, batch.indices, packed)
    return out.view(n, s, *packed.shape[1:])
