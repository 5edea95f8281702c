"""Padding-free BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ALBERT) and HF weight loading."""

from trimformer.models.encoders.config import EncoderConfig
from trimformer.models.encoders.embeddings import EncoderEmbeddings
from trimformer.models.encoders.loading import (
    load_encoder,
    read_config,
    read_state_dict,
    resolve_device,
    resolve_dtype,
)
from trimformer.models.encoders.model import EncoderModel
from trimformer.models.encoders.registry import SUPPORTED_MODEL_TYPES, config_from_dict
from trimformer.models.encoders.weights import from_hf_state_dict, hf_key_map, to_hf_state_dict

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "EncoderConfig",
    "EncoderEmbeddings",
    "EncoderModel",
    "config_from_dict",
    "from_hf_state_dict",
    "hf_key_map",
    "load_encoder",
    "read_config",
    "read_state_dict",
    "resolve_device",
    "resolve_dtype",
    "to_hf_state_dict",
]
