"""Preallocated decode caches for the attention layers: static shapes, appended in place, one entry per layer.

``AttentionCache.allocate(configs, batch_size, max_len, dtype=..., device=...)`` builds one layer entry per
attention layer, chosen by the layer's ``kind``:

* :class:`KVCacheLayer` (MHA, GQA): ``key``/``value`` ``[B, S_max, H_kv, D]``;
* :class:`CCACacheLayer` (CCA, CCGQA): the same compressed ``key``/``value`` (final k after conv, qk-mean, norm,
  temperature and RoPE; v after the value shift) plus the constant-size state: ``conv_state [B, Cq + Ck, P]`` (the
  last ``P`` pre-conv ``[q0 | k0]`` rows, oldest first) and ``value_state [B, Ck/2]`` (the previous token's delayed
  value projection, bias included);
* :class:`MLACacheLayer` (MLA): ``latent [B, S_max, 1, kv_lora_rank + rope_head_dim]``, the normalised KV latent
  followed by the RoPE'd decoupled key; it serves as both K and V of the absorbed attention.

Every entry carries its own ``seqlens [B]`` int32 (valid rows per sequence) on the device: a layer reads it,
appends its new tokens and advances it in place, so the layers of one model never disagree. A row whose
``seqlens`` is 0 starts fresh (its conv/value states are ignored), so a slot is recycled by :meth:`reset`.
The layers never read ``seqlens`` back to the host; instead each entry keeps a host-side upper bound
(``reserved``) of its longest row and refuses a forward that could overflow ``max_len``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trimformer.layers.cca import AttentionConfig


class _LayerCacheBase(ABC):
    """Shared bookkeeping: ``seqlens`` ``[B]`` int32 on the device and the host bound ``reserved``."""

    seqlens: torch.Tensor
    reserved: int
    max_len: int

    @property
    def batch_size(self) -> int:
        """``B``, the number of sequences (rows)."""
        return self.seqlens.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the stored keys/values/states."""
        return self._tensors()[0].dtype

    def reserve(self, new_tokens: int) -> None:
        """Account for a forward appending at most ``new_tokens`` rows to any sequence (host-only check).

        Raises:
            ValueError: when ``reserved + new_tokens > max_len``.
        """
        if self.reserved + new_tokens > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} positions per sequence; this forward may append {new_tokens} to "
                f"up to {self.reserved} already used (allocate a larger cache or reset it)"
            )
        self.reserved += new_tokens

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Empty all rows (``rows=None``) or the rows selected by an index or bool ``[B]`` tensor, in place.

        A full reset also clears the host bound; a partial one keeps it (it stays an upper bound).
        """
        if rows is None:
            self.seqlens.zero_()
            for t in self._tensors():
                t.zero_()
            self.reserved = 0
            return
        self.seqlens[rows] = 0
        for t in self._tensors():
            t[rows] = 0

    @abstractmethod
    def _tensors(self) -> list[torch.Tensor]:
        """Every state tensor of the entry (zeroed by :meth:`reset`, counted by ``nbytes``)."""


class KVCacheLayer(_LayerCacheBase):
    """Keys and values of one MHA/GQA layer.

    Attributes:
        key, value: ``[B, S_max, H_kv, D]``.
        seqlens: ``[B]`` int32, valid rows per sequence.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, seqlens: torch.Tensor) -> None:
        if key.shape != value.shape or key.dim() != 4 or seqlens.shape != (key.shape[0],):
            raise ValueError(
                f"key/value must be equal [B, S_max, H, D] and seqlens [B], got {tuple(key.shape)}, "
                f"{tuple(value.shape)}, {tuple(seqlens.shape)}"
            )
        self.key, self.value, self.seqlens = key, value, seqlens
        self.max_len = key.shape[1]
        self.reserved = 0

    def write(self, rows: torch.Tensor, cols: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store token ``i`` at ``[rows[i], cols[i]]`` in place. ``rows, cols [T]`` int64; ``key, value [T, H, D]``."""
        self.key.index_put_((rows, cols), key.to(self.key.dtype))
        self.value.index_put_((rows, cols), value.to(self.value.dtype))

    def _tensors(self) -> list[torch.Tensor]:
        return [self.key, self.value]


class CCACacheLayer(KVCacheLayer):
    """Compressed keys/values of one CCA/CCGQA layer plus its conv and value-shift states.

    Attributes:
        key, value: ``[B, S_max, h_k, d_h]``.
        conv_state: ``[B, Cq + Ck, P]`` last ``P`` pre-conv rows (oldest first).
        value_state: ``[B, Ck/2]`` delayed value projection of the last token.
        seqlens: ``[B]`` int32.
    """

    def __init__(self, key, value, seqlens, conv_state: torch.Tensor, value_state: torch.Tensor) -> None:
        super().__init__(key, value, seqlens)
        b = key.shape[0]
        if (
            conv_state.dim() != 3
            or conv_state.shape[0] != b
            or value_state.shape != (b, key.shape[2] * key.shape[3] // 2)
        ):
            raise ValueError(
                f"conv_state must be [B, C, P] and value_state [B, Ck/2], got {tuple(conv_state.shape)} and "
                f"{tuple(value_state.shape)}"
            )
        self.conv_state, self.value_state = conv_state, value_state

    def _tensors(self) -> list[torch.Tensor]:
        return [self.key, self.value, self.conv_state, self.value_state]


class MLACacheLayer(_LayerCacheBase):
    """Compressed KV latent and decoupled RoPE key of one MLA layer.

    Attributes:
        latent: ``[B, S_max, 1, kv_lora_rank + rope_head_dim]`` (normalised latent, then the RoPE'd key).
        kv_lora_rank: width of the latent part.
        seqlens: ``[B]`` int32.
    """

    def __init__(self, latent: torch.Tensor, seqlens: torch.Tensor, kv_lora_rank: int) -> None:
        if latent.dim() != 4 or latent.shape[2] != 1 or seqlens.shape != (latent.shape[0],):
            raise ValueError(f"latent must be [B, S_max, 1, r + d_rope], got {tuple(latent.shape)}")
        self.latent, self.seqlens, self.kv_lora_rank = latent, seqlens, kv_lora_rank
        self.max_len = latent.shape[1]
        self.reserved = 0

    def write(self, rows: torch.Tensor, cols: torch.Tensor, entry: torch.Tensor) -> None:
        """Store ``entry [T, r + d_rope]`` of token ``i`` at ``[rows[i], cols[i]]`` in place."""
        self.latent[:, :, 0].index_put_((rows, cols), entry.to(self.latent.dtype))

    def _tensors(self) -> list[torch.Tensor]:
        return [self.latent]


def allocate_layer_cache(
    config: AttentionConfig, batch_size: int, max_len: int, *, dtype: torch.dtype, device=None
) -> KVCacheLayer | CCACacheLayer | MLACacheLayer:
    """Zero-filled cache entry for one layer of ``config.kind`` (see the module docstring for shapes)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size} and {max_len}")
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
    seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
    if config.kind == "mla":
        width = config.kv_lora_rank + config.rope_head_dim
        return MLACacheLayer(zeros(batch_size, max_len, 1, width), seqlens, config.kv_lora_rank)
    kv = (batch_size, max_len, config.num_kv_heads, config.head_dim)
    if config.kind in ("mha", "gqa"):
        return KVCacheLayer(zeros(*kv), zeros(*kv), seqlens)
    return CCACacheLayer(
        zeros(*kv),
        zeros(*kv),
        seqlens,
        zeros(batch_size, config.conv_channels, config.conv_padding),
        zeros(batch_size, config.kv_width // 2),
    )


class AttentionCache:
    """Per-layer decode caches of a model (``cache.layers[i]`` belongs to the layer called with ``layer_idx=i``).

    Prefill into an empty cache, chunked prefill (resume) and token-by-token decode all go through the layers'
    ``forward(x, ..., cache=cache, layer_idx=i)``.
    """

    def __init__(self, layers: Sequence[KVCacheLayer | CCACacheLayer | MLACacheLayer]) -> None:
        if not layers:
            raise ValueError("an AttentionCache needs at least one layer entry")
        sizes = {(layer.batch_size, layer.max_len) for layer in layers}
        if len(sizes) != 1:
            raise ValueError(f"all layer entries must share (batch_size, max_len), got {sorted(sizes)}")
        self.layers = list(layers)

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
    ) -> AttentionCache:
        """Allocate zero-filled entries.

        Args:
            configs: one ``AttentionConfig`` per layer, or a single one repeated ``num_layers`` times.
            batch_size: ``B`` rows (sequences).
            max_len: positions per row (prompt + generated tokens, counting left padding of dense prompts).
            num_layers: required with a single config.
            dtype: must equal the activation dtype of the layers that use the cache.
            device: where the tensors live.
        """
        if not isinstance(configs, Sequence):
            if num_layers is None or num_layers < 1:
                raise ValueError("num_layers (>= 1) is required when a single config is given")
            configs = [configs] * num_layers
        elif num_layers is not None and num_layers != len(configs):
            raise ValueError(f"num_layers={num_layers} but {len(configs)} configs were given")
        return cls([allocate_layer_cache(c, batch_size, max_len, dtype=dtype, device=device) for c in configs])

    @property
    def seqlens(self) -> torch.Tensor:
        """``[B]`` int32 lengths held by layer 0 (equal for every layer between full model forwards)."""
        return self.layers[0].seqlens

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.layers[0].batch_size

    @property
    def max_len(self) -> int:
        """Positions per row."""
        return self.layers[0].max_len

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        """``[B]`` int32 lengths held by one layer."""
        return self.layers[layer_idx].seqlens

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Empty every layer's entry, fully or for the selected rows (see ``reset`` of the entries)."""
        for layer in self.layers:
            layer.reset(rows)

    def nbytes(self) -> int:
        """Bytes held by all tensors of all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in [*layer._tensors(), layer.seqlens])
