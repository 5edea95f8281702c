"""HF activation names and the canonical kind each implementation computes (shared by api.py and naive.py)."""

from __future__ import annotations

#: HF ``hidden_act`` name -> canonical kind.
ACTIVATIONS: dict[str, str] = {
    "gelu": "gelu_erf",
    "gelu_python": "gelu_erf",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
    "linear": "identity",
}


def canonical_activation(act: str) -> str:
    """The canonical kind of an HF activation name; ``ValueError`` listing the supported names otherwise."""
    kind = ACTIVATIONS.get(act)
    if kind is None:
        raise ValueError(f"unsupported activation {act!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return kind
