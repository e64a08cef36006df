"""Shared test helpers: tiny Hugging Face models on disk and a transformers greedy reference."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with transformers' own forward and KV cache: argmax at every step."""
    import torch
    ids = torch.tensor([prompt_ids])
    out, past = [], None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            ids = torch.tensor([[token]])
    return out


TINY_KINDS = {
    # kind: (transformers config class name, extra config)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "llama-mha": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
}


def build_tiny_hf(kind: str, path, vocab_size: int = 512, seed: int = 0):
    """A random-weight model saved as an HF folder (config.json + safetensors)."""
    import torch
    import transformers
    cls_name, extra = TINY_KINDS[kind]
    extra = dict(extra)
    cfg = getattr(transformers, cls_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=extra.pop("num_key_value_heads", 2),
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(cfg).eval()
    with torch.no_grad():  # larger weights than the init so that greedy paths are not degenerate
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def default_model_path():
    from jpaged.models.loader import resolve_model_path
    return resolve_model_path(None)
