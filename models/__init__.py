"""Flax model definitions, their loaders (Hugging Face folders and GGUF files) and the registry
from `config.model_type` to a model class."""
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM
from .registry import MODEL_REGISTRY, SUPPORTED_MODEL_TYPES, model_class

__all__ = ["ModelConfig", "LlamaForCausalLM", "OPTForCausalLM", "MODEL_REGISTRY", "SUPPORTED_MODEL_TYPES",
           "model_class"]
