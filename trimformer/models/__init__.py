"""Whole models and HF weight loading. Encoders: :mod:`trimformer.models.encoders`."""
