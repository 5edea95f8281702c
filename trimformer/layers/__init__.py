"""nn.Modules composed from ops."""

from trimformer.layers.encoder import EncoderLayer

__all__ = ["EncoderLayer"]
