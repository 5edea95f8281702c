"""Relative-position index tables of disentangled attention, built once per shape on the host and cached.

For relative distance ``r = i - j`` (query ``i``, key ``j`` of the same sequence) the position row read by both the
c2p and the p2c term is ``clamp(bucket(r) + span, 0, 2 span - 1)``: DeBERTa's log buckets are odd in ``r``, so the
p2c index ``clamp(-bucket(j - i) + span)`` is the same row. A table over ``r in [-(L - 1), L - 1]`` turns the
bucketing (logs and ceils) into one integer gather inside the kernel and gives exactly the indices HF computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIN_TABLE_LEN = 64


def log_bucket(relative_pos: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa log buckets of int64 relative positions (same float32 arithmetic as HF), int64 out."""
    sign = torch.sign(relative_pos)
    mid = bucket_size // 2
    inside = (relative_pos < mid) & (relative_pos > -mid)
    abs_pos = torch.where(inside, torch.tensor(mid - 1).type_as(relative_pos), torch.abs(relative_pos))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, relative_pos.type_as(log_pos), log_pos * sign).to(torch.long)


@dataclass(frozen=True)
class RelativeIndex:
    """Index table of one ``(length, span, bucketing)`` on one device.

    Attributes:
        table: ``[2 L - 1]`` int32 on the device; ``table[r + L - 1]`` is the position row for distance ``r``,
            already shifted by ``-lo``.
        length: ``L``, the longest sequence the table covers.
        lo, hi: first and last position row any distance reaches (host ints): only rows ``lo .. hi`` of the
            position projections are ever read, so callers slice them.
    """

    table: torch.Tensor
    length: int
    lo: int
    hi: int


_cache: dict[tuple, RelativeIndex] = {}


def relative_index(
    max_seqlen: int, span: int, position_buckets: int, max_relative_positions: int, device: torch.device
) -> RelativeIndex:
    """The cached :class:`RelativeIndex` covering sequences up to ``max_seqlen`` tokens (rounded up to a power of two
    so a stream of batches reuses a few tables). Built on the CPU, copied to ``device`` once."""
    length = _MIN_TABLE_LEN
    while length < max_seqlen:
        length *= 2
    key = (str(device), length, span, position_buckets, max_relative_positions)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    rel = torch.arange(-(length - 1), length, dtype=torch.long)
    if position_buckets > 0 and max_relative_positions > 0:
        rel = log_bucket(rel, position_buckets, max_relative_positions)
    rows = torch.clamp(rel + span, 0, 2 * span - 1)
    lo, hi = int(rows[0]), int(rows[-1])
    entry = RelativeIndex((rows - lo).to(torch.int32).to(device), length, lo, hi)
    _cache[key] = entry
    return entry
