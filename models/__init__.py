"""Flax model definitions, their loaders (Hugging Face folders, GGUF files and in-memory
state dicts), the registry from `config.model_type` to a model class, and a plain causal
forward over the same params for training (`causal_forward`)."""
from .causal import causal_forward
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .loader import convert_state_dict
from .opt import OPTForCausalLM
from .registry import MODEL_REGISTRY, SUPPORTED_MODEL_TYPES, model_class

__all__ = ["ModelConfig", "LlamaForCausalLM", "OPTForCausalLM", "MODEL_REGISTRY", "SUPPORTED_MODEL_TYPES",
           "model_class", "causal_forward", "convert_state_dict"]
