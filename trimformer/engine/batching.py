"""Token-budget batching: sort by length, then pack consecutive sequences until the token budget is full."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], batch_tokens: int, *, max_batch_size: int | None = None) -> list[list[int]]:
    """Group sequence indices into batches of at most ``batch_tokens`` valid tokens.

    Sequences are visited longest first (ties keep input order), so each batch holds similar lengths; a sequence
    longer than the budget gets a batch of its own. No padding is implied: the budget counts real tokens.

    Args:
        lengths: token count of each sequence.
        batch_tokens: token budget per batch (> 0).
        max_batch_size: optional cap on sequences per batch.

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once.
    """
    if not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool) or batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    if max_batch_size is not None and max_batch_size <= 0:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        full = used + n > batch_tokens or (max_batch_size is not None and len(current) >= max_batch_size)
        if current and full:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches
