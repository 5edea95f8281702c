"""Trimformer causal LM: HF ``PretrainedConfig`` / ``PreTrainedModel`` / ``GenerationMixin`` with any attention kind.

Importing this package registers ``model_type="trimformer"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` (``exist_ok=True``), so ``AutoModelForCausalLM.from_pretrained(folder)`` loads a saved model.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from trimformer.models.lm.cache import TrimformerCache
from trimformer.models.lm.configuration import TrimformerConfig
from trimformer.models.lm.modeling import (
    TrimformerCausalLMOutput,
    TrimformerForCausalLM,
    TrimformerModel,
    TrimformerModelOutput,
    TrimformerPreTrainedModel,
)
from trimformer.models.lm.sizing import model_params, param_matched_config

AutoConfig.register(TrimformerConfig.model_type, TrimformerConfig, exist_ok=True)
AutoModel.register(TrimformerConfig, TrimformerModel, exist_ok=True)
AutoModelForCausalLM.register(TrimformerConfig, TrimformerForCausalLM, exist_ok=True)

__all__ = [
    "TrimformerCache",
    "TrimformerCausalLMOutput",
    "TrimformerConfig",
    "TrimformerForCausalLM",
    "TrimformerModel",
    "TrimformerModelOutput",
    "TrimformerPreTrainedModel",
    "model_params",
    "param_matched_config",
]
