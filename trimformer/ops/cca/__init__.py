"""Compressed Convolutional Attention (CCA / CCGQA) ops: the prologue between projections and attention."""

from trimformer.ops.cca.api import TEMPERATURE_MODES, cca_decode_prologue, cca_project_prologue, cca_prologue
from trimformer.ops.cca.naive import naive_cca_decode_prologue, naive_cca_project_prologue, naive_cca_prologue

__all__ = [
    "TEMPERATURE_MODES",
    "cca_decode_prologue",
    "cca_project_prologue",
    "cca_prologue",
    "naive_cca_decode_prologue",
    "naive_cca_project_prologue",
    "naive_cca_prologue",
]
