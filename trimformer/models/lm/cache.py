"""The adapter from trimformer's preallocated :class:`~trimformer.layers.cache.AttentionCache` to transformers'
``Cache`` API, so ``generate()`` carries the compressed CCA/MLA caches between steps.

transformers 5.x hands the model's cache back and forth under ``past_key_values`` (up to 5.2x) or ``cache`` (5.24+);
:class:`TrimformerCache` is a ``transformers.Cache`` subclass so either version's generation loop can query it
(``get_seq_length``, ``is_compileable``, ``is_linear``, ...). The trimformer attention layers write it themselves
(``cache.attention_cache.layers[i]``); ``update`` of the HF API is not used.

Lengths: HF asks ``get_seq_length()`` for the number of input *columns* already consumed (left padding included),
which is what it slices ``input_ids`` by; that count is kept on the host (no device sync). The per-row number of real
cached tokens lives on the device in ``attention_cache.seqlens``.

The cache is preallocated and, when ``growable``, reallocated with twice the room (copying the rows) before a
forward that would overflow it, so ``generate`` does not need to know the final length up front.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Cache

from trimformer.layers.cache import AttentionCache, CCACacheLayer, KVCacheLayer, MLACacheLayer
from trimformer.layers.cca import AttentionConfig

_ROUND = 64  # cache lengths are rounded up to this many positions


def _round_up(n: int, m: int = _ROUND) -> int:
    return max(m, -(-n // m) * m)


def _rebuild(entry, rows: Callable[[torch.Tensor], torch.Tensor], max_len: int | None = None):
    """A new cache entry of the same kind: ``rows`` maps every tensor's batch dim; ``max_len`` pads the sequence dim."""

    def seq(t: torch.Tensor) -> torch.Tensor:
        t = rows(t)
        if max_len is None or max_len == t.shape[1]:
            return t.clone()
        return F.pad(t, (0, 0, 0, 0, 0, max_len - t.shape[1]))

    seqlens = rows(entry.seqlens).clone()
    if isinstance(entry, CCACacheLayer):
        new = CCACacheLayer(seq(entry.key), seq(entry.value), seqlens, rows(entry.conv_state).clone(),
                            rows(entry.value_state).clone())  # fmt: skip
    elif isinstance(entry, KVCacheLayer):
        new = KVCacheLayer(seq(entry.key), seq(entry.value), seqlens)
    elif isinstance(entry, MLACacheLayer):
        new = MLACacheLayer(seq(entry.latent), seqlens, entry.kv_lora_rank)
    else:
        raise ValueError(f"unknown cache entry type {type(entry).__name__}")
    new.reserved = entry.reserved
    return new


class TrimformerCache(Cache):
    """HF ``Cache`` view of a trimformer :class:`AttentionCache` (one entry per decoder layer).

    Attributes:
        attention_cache: the per-layer entries the attention layers read and advance in place.
        growable: reallocate with more room instead of raising when a forward would overflow ``max_len``.
        columns: host count of input columns consumed so far (what HF's ``get_seq_length`` reports).
    """

    def __init__(self, attention_cache: AttentionCache, *, growable: bool = True) -> None:
        if not isinstance(attention_cache, AttentionCache):
            raise ValueError(f"attention_cache must be an AttentionCache, got {type(attention_cache).__name__}")
        super().__init__(layers=list(attention_cache.layers))
        self.attention_cache = attention_cache
        self.growable = growable
        self.columns = 0

    @classmethod
    def allocate(
        cls,
        configs: AttentionConfig | Sequence[AttentionConfig],
        batch_size: int,
        max_len: int,
        *,
        num_layers: int | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
        growable: bool = True,
    ) -> TrimformerCache:
        """Zero-filled cache; arguments as :meth:`AttentionCache.allocate` (``max_len`` is rounded up to 64)."""
        cache = AttentionCache.allocate(
            configs, batch_size, _round_up(max_len), num_layers=num_layers, dtype=dtype, device=device
        )
        return cls(cache, growable=growable)

    # ----- what the model calls -------------------------------------------------------------------------------
    def prepare(self, new_tokens: int, new_columns: int) -> AttentionCache:
        """Make room for a forward appending up to ``new_tokens`` rows per sequence, record ``new_columns``.

        Returns the :class:`AttentionCache` to hand to the layers (a new one after growth).

        Raises:
            ValueError: the cache is full and not growable.
        """
        need = max(entry.reserved for entry in self.attention_cache.layers) + new_tokens
        if need > self.attention_cache.max_len:
            if not self.growable:
                raise ValueError(
                    f"the cache holds {self.attention_cache.max_len} positions per sequence but this forward needs "
                    f"{need}; allocate a larger TrimformerCache or pass growable=True"
                )
            self._replace(lambda t: t, _round_up(max(need, 2 * self.attention_cache.max_len)))
        self.columns += new_columns
        return self.attention_cache

    def _replace(self, rows: Callable[[torch.Tensor], torch.Tensor], max_len: int | None = None) -> None:
        entries = [_rebuild(e, rows, max_len) for e in self.attention_cache.layers]
        self.attention_cache = AttentionCache(entries)
        self.layers = list(entries)

    # ----- the transformers Cache API -------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns consumed so far (left padding included), a host int."""
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """``-1`` (no limit) when growable, else the positions per sequence."""
        return -1 if self.growable else self.attention_cache.max_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """Same as :meth:`get_max_length` (the name older transformers releases use)."""
        return self.get_max_length(layer_idx)

    @property
    def max_batch_size(self) -> int:
        """``B``."""
        return self.attention_cache.batch_size

    @property
    def max_cache_len(self) -> int:
        """Positions per sequence currently allocated."""
        return self.attention_cache.max_len

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    def update(self, *args, **kwargs):
        raise NotImplementedError("TrimformerCache is written by the trimformer attention layers, not via update()")

    def reset(self) -> None:
        """Empty every row of every layer."""
        self.attention_cache.reset()
        self.columns = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (``[B]`` int64), in every layer."""
        idx = beam_idx.to(device=self.attention_cache.seqlens.device, dtype=torch.long)
        self._replace(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (``[B] -> [B * repeats]``)."""
        self._replace(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows ``indices``."""
        idx = indices.to(device=self.attention_cache.seqlens.device, dtype=torch.long)
        self._replace(lambda t: t.index_select(0, idx))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "TrimformerCache cannot be cropped: CCA conv and value-shift states cannot be rewound "
            "(assisted/speculative decoding is not supported)"
        )

    def activate_past_recording(self) -> None:
        raise NotImplementedError("TrimformerCache does not record past states (it cannot be rolled back)")

    def early_initialization(self, *args, **kwargs) -> None:
        """Nothing to do: the entries are allocated up front."""

    def __repr__(self) -> str:
        c = self.attention_cache
        return (f"TrimformerCache(layers={len(c.layers)}, batch_size={c.batch_size}, max_len={c.max_len}, "
                f"columns={self.columns}, growable={self.growable})")  # fmt: skip
