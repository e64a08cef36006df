"""The one list of supported model types: `config.model_type` -> the Flax class that runs it."""
from __future__ import annotations

from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM

MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "opt": OPTForCausalLM,
}
SUPPORTED_MODEL_TYPES = tuple(MODEL_REGISTRY)


def model_class(model_type: str):
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}; jpaged supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}") from None
