"""Supported ``model_type`` values and their config parsers; errors list what is supported."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trimformer.models.encoders.config import EncoderConfig, parse_albert, parse_bert_like, parse_distilbert

_PARSERS: dict[str, Callable[[dict[str, Any], str], EncoderConfig]] = {
    "bert": parse_bert_like,
    "roberta": parse_bert_like,
    "xlm-roberta": parse_bert_like,
    "distilbert": parse_distilbert,
    "albert": parse_albert,
}

#: ``model_type`` strings trimformer can load (HF ``config.json``), sorted.
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_PARSERS))

#: Families with their own packed model class: ``model_type`` -> module exposing ``parse_config(d, model_type)``
#: and ``load(path, config, *, device, dtype, impl)`` (imported on first use).
FAMILY_MODULES: dict[str, str] = {
    "deberta-v2": "trimformer.models.encoders.deberta_v2",
    "modernbert": "trimformer.models.encoders.modernbert",
}

#: Every loadable ``model_type``: the BERT family first, then the families with their own model class.
ALL_MODEL_TYPES: tuple[str, ...] = SUPPORTED_MODEL_TYPES + tuple(sorted(FAMILY_MODULES))


def family_module(model_type: str):
    """The module of a family with its own model class (see :data:`FAMILY_MODULES`), or ``None``."""
    import importlib

    name = FAMILY_MODULES.get(model_type)
    return None if name is None else importlib.import_module(name)


def config_from_dict(d: dict[str, Any], *, source: str = "config") -> EncoderConfig:
    """Parse an HF ``config.json`` dict into an :class:`EncoderConfig`.

    Raises:
        ValueError: the ``model_type`` is missing or unsupported (the message lists the supported types), or the
            config describes something this engine cannot run.
    """
    model_type = d.get("model_type")
    if model_type in FAMILY_MODULES:
        return family_module(model_type).parse_config(d, model_type)
    if model_type not in _PARSERS:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(ALL_MODEL_TYPES)}")
    return _PARSERS[model_type](d, model_type)
