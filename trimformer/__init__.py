"""trimformer: transformers that compute only what they need.

Two pillars:

* a padding-free BERT-family encoder engine (``trimformer.Encoder``), and
* Compressed Convolutional Attention layers and models (``trimformer.layers.CCAttention``).

Heavy modules are imported lazily so ``import trimformer`` and ``trimformer --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "trimformer.engine.encoder",
    "CCAttention": "trimformer.layers.cca",
    "TrimformerConfig": "trimformer.models.lm",
    "TrimformerForCausalLM": "trimformer.models.lm",
}

if TYPE_CHECKING:
    from trimformer.engine.encoder import Encoder  # noqa: F401
    from trimformer.layers.cca import CCAttention  # noqa: F401
    from trimformer.models.lm import TrimformerConfig, TrimformerForCausalLM  # noqa: F401

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trimformer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
