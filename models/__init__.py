"""Flax model definitions and the registry from `config.model_type` to a model class."""
from .config import ModelConfig
from .llama import LlamaForCausalLM

MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def model_class(model_type: str):
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{sorted(MODEL_REGISTRY)}") from None


__all__ = ["ModelConfig", "LlamaForCausalLM", "MODEL_REGISTRY", "model_class"]
