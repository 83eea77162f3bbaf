"""DeepSeek modeling: the HF-compatible reference models and their configurations."""

from .configuration_deepseek import DeepseekConfig, DeepseekV2Config
from .modeling_deepseek import (
    DeepseekForCausalLM,
    DeepseekModel,
    DeepseekPreTrainedModel,
    DeepseekV2ForCausalLM,
    DeepseekV2Model,
    DeepseekV2PreTrainedModel,
    IGNORE_INDEX,
    next_token_cross_entropy,
)
from .loading import load_config, model_class_for, build_model

__all__ = [
    "DeepseekConfig", "DeepseekV2Config",
    "DeepseekForCausalLM", "DeepseekModel", "DeepseekPreTrainedModel",
    "DeepseekV2ForCausalLM", "DeepseekV2Model", "DeepseekV2PreTrainedModel",
    "load_config", "model_class_for", "build_model", "IGNORE_INDEX", "next_token_cross_entropy",
]
