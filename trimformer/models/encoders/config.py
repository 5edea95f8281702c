"""Encoder configuration: one frozen dataclass for every supported BERT-family ``model_type``, parsed from an HF
``config.json``. Keys missing from the file take the defaults of the matching HF config class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trimformer.ops.activation import canonical_activation

_BERT_DEFAULTS = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
_ROBERTA_DEFAULTS = {**_BERT_DEFAULTS, "vocab_size": 50265, "pad_token_id": 1}
_XLMR_DEFAULTS = {**_ROBERTA_DEFAULTS, "vocab_size": 30522}
_DISTILBERT_DEFAULTS = {
    "vocab_size": 30522,
    "dim": 768,
    "n_layers": 6,
    "n_heads": 12,
    "hidden_dim": 3072,
    "activation": "gelu",
    "max_position_embeddings": 512,
    "pad_token_id": 0,
}
_ALBERT_DEFAULTS = {
    "vocab_size": 30000,
    "embedding_size": 128,
    "hidden_size": 4096,
    "num_hidden_layers": 12,
    "num_hidden_groups": 1,
    "num_attention_heads": 64,
    "intermediate_size": 16384,
    "inner_group_num": 1,
    "hidden_act": "gelu_new",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class EncoderConfig:
    """Shape and numerics of a padding-free encoder.

    Attributes:
        model_type: the HF ``model_type`` (``bert``, ``roberta``, ``xlm-roberta``, ``distilbert``, ``albert``).
        vocab_size, hidden_size, num_heads, intermediate_size: the usual sizes.
        num_layers: layer applications per forward (HF ``num_hidden_layers``; ALBERT reuses shared layers).
        activation: HF activation name of the FFN.
        layer_norm_eps: epsilon of every LayerNorm.
        max_position_embeddings: rows of the position table.
        type_vocab_size: rows of the token-type table; ``0`` when the model has none (DistilBERT).
        pad_token_id: padding token id (``None`` if the config has none).
        position_offset: first position id of a sequence (``pad_token_id + 1`` for RoBERTa/XLM-R, else ``0``).
        embedding_size: width of the embedding tables (differs from ``hidden_size`` in ALBERT).
        embedding_projection: whether a Linear ``embedding_size -> hidden_size`` follows the embedding LayerNorm.
        num_hidden_groups, inner_group_num: ALBERT layer sharing: ``num_layers`` steps run the layers of group
            ``int(i / (num_layers / num_hidden_groups))``, each group holding ``inner_group_num`` layers. ``None``
            (the default) means one group per step, i.e. no sharing.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    activation: str
    layer_norm_eps: float
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int | None
    position_offset: int
    embedding_size: int
    embedding_projection: bool = False
    num_hidden_groups: int | None = None
    inner_group_num: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_layers", "embedding_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{self.model_type} config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{self.model_type} config: hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_heads}"
            )
        if self.max_position_embeddings <= self.position_offset:
            raise ValueError(
                f"{self.model_type} config: max_position_embeddings {self.max_position_embeddings} leaves no "
                f"position after the offset {self.position_offset}"
            )
        if self.num_hidden_groups is None:
            object.__setattr__(self, "num_hidden_groups", self.num_layers)
        if self.num_hidden_groups <= 0 or self.inner_group_num <= 0 or self.num_hidden_groups > self.num_layers:
            raise ValueError(
                f"{self.model_type} config: need 0 < num_hidden_groups ({self.num_hidden_groups}) <= "
                f"num_hidden_layers ({self.num_layers}) and inner_group_num ({self.inner_group_num}) > 0"
            )
        canonical_activation(self.activation)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest sequence the position table can hold."""
        return self.max_position_embeddings - self.position_offset

    @property
    def num_unique_layers(self) -> int:
        """Distinct layers with their own weights (``num_layers`` except for ALBERT)."""
        return self.num_hidden_groups * self.inner_group_num

    @property
    def layer_schedule(self) -> tuple[int, ...]:
        """Index of the unique layer run at each step of a forward (ALBERT's group assignment, identity elsewhere)."""
        schedule = []
        for i in range(self.num_layers):
            group = int(i / (self.num_layers / self.num_hidden_groups))
            schedule.extend(group * self.inner_group_num + j for j in range(self.inner_group_num))
        return tuple(schedule)


def _get(d: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
    value = d.get(key)
    return defaults[key] if value is None else value


def _check_common(d: dict[str, Any], model_type: str) -> None:
    pos = d.get("position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(
            f"{model_type} config: position_embedding_type {pos!r} is not supported (only 'absolute' positions)"
        )
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise ValueError(f"{model_type} config: decoder / cross-attention models are not supported (encoders only)")


def parse_bert_like(d: dict[str, Any], model_type: str) -> EncoderConfig:
    """BERT, RoBERTa and XLM-RoBERTa configs (RoBERTa-family positions start at ``pad_token_id + 1``)."""
    _check_common(d, model_type)
    defaults = {"bert": _BERT_DEFAULTS, "roberta": _ROBERTA_DEFAULTS}.get(model_type, _XLMR_DEFAULTS)
    pad = _get(d, defaults, "pad_token_id")
    hidden = _get(d, defaults, "hidden_size")
    return EncoderConfig(
        model_type=model_type,
        vocab_size=_get(d, defaults, "vocab_size"),
        hidden_size=hidden,
        num_heads=_get(d, defaults, "num_attention_heads"),
        intermediate_size=_get(d, defaults, "intermediate_size"),
        num_layers=_get(d, defaults, "num_hidden_layers"),
        activation=_get(d, defaults, "hidden_act"),
        layer_norm_eps=float(_get(d, defaults, "layer_norm_eps")),
        max_position_embeddings=_get(d, defaults, "max_position_embeddings"),
        type_vocab_size=_get(d, defaults, "type_vocab_size"),
        pad_token_id=pad,
        position_offset=0 if model_type == "bert" else int(pad) + 1,
        embedding_size=hidden,
    )


def parse_distilbert(d: dict[str, Any], model_type: str = "distilbert") -> EncoderConfig:
    """DistilBERT config (``dim``, ``n_heads``, ``hidden_dim``, ...; no token types; LayerNorm eps 1e-12)."""
    g = lambda key: _get(d, _DISTILBERT_DEFAULTS, key)
    return EncoderConfig(
        model_type=model_type,
        vocab_size=g("vocab_size"),
        hidden_size=g("dim"),
        num_heads=g("n_heads"),
        intermediate_size=g("hidden_dim"),
        num_layers=g("n_layers"),
        activation=g("activation"),
        layer_norm_eps=1e-12,
        max_position_embeddings=g("max_position_embeddings"),
        type_vocab_size=0,
        pad_token_id=g("pad_token_id"),
        position_offset=0,
        embedding_size=g("dim"),
    )


def parse_albert(d: dict[str, Any], model_type: str = "albert") -> EncoderConfig:
    """ALBERT config: factorized embeddings (``embedding_size``) and shared layers (groups x inner layers)."""
    _check_common(d, model_type)
    g = lambda key: _get(d, _ALBERT_DEFAULTS, key)
    return EncoderConfig(
        model_type=model_type,
        vocab_size=g("vocab_size"),
        hidden_size=g("hidden_size"),
        num_heads=g("num_attention_heads"),
        intermediate_size=g("intermediate_size"),
        num_layers=g("num_hidden_layers"),
        activation=g("hidden_act"),
        layer_norm_eps=float(g("layer_norm_eps")),
        max_position_embeddings=g("max_position_embeddings"),
        type_vocab_size=g("type_vocab_size"),
        pad_token_id=g("pad_token_id"),
        position_offset=0,
        embedding_size=g("embedding_size"),
        embedding_projection=True,
        num_hidden_groups=g("num_hidden_groups"),
        inner_group_num=g("inner_group_num"),
    )
