"""Rotary position embeddings: NeoX rotate-half with partial rotation, and cos/sin tables."""

from trimformer.ops.rope.api import apply_rotary, rotary_cos_sin, rotary_inv_freq
from trimformer.ops.rope.naive import naive_apply_rotary, naive_rotary_cos_sin

__all__ = ["apply_rotary", "naive_apply_rotary", "naive_rotary_cos_sin", "rotary_cos_sin", "rotary_inv_freq"]
