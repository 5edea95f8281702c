"""Activation ops: fused bias + activation for the FFN of an encoder."""

from trimformer.ops.activation.api import ACTIVATIONS, bias_act, canonical_activation
from trimformer.ops.activation.naive import naive_bias_act

__all__ = ["ACTIVATIONS", "bias_act", "canonical_activation", "naive_bias_act"]
