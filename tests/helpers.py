"""Helpers shared by the tests (plain functions; fixtures are in conftest.py files).

- `hf_greedy`, `build_tiny_hf`: tiny random Hugging Face models on disk and transformers'
  own greedy decoding, the reference for token-for-token parity;
- `NoTokenizer`: for tiny random models, whose prompts are token ids;
- `tiny_llm`: one tiny random Llama engine shared by the sharing / prefix-cache / swap /
  beam tests. Building and compiling an engine dominates those tests' time on the CPU,
  so they share one (per process), built once: block_size 16, 64 blocks (1,024 token
  slots), up to 8 sequences, prefill chunks of 128 tokens, max_model_len 640 (the model's
  position limit is raised to 1,024: RoPE has no learned positions), preemption by swap
  with room for 256 host blocks. Tests that need recompute set
  `llm.config.preemption_mode` and restore it;
- `check_engine_invariants`, `run_checked`: the block manager's counts against what the
  sequences really hold, after every step.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import types

from jpaged.utils import kv_bytes_per_block

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


# What build_tiny_hf makes: 3 layers, 4 heads of 16 (hidden 64), 2 KV heads (4 for llama-mha).
TINY_SHAPE = types.SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=16)
BLOCK_SIZE = 16
NUM_BLOCKS = 64
PER_BLOCK = kv_bytes_per_block(TINY_SHAPE, BLOCK_SIZE, "float32")


class NoTokenizer:
    """Tiny random models have no tokenizer; prompts are token ids and text stays empty."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


@functools.lru_cache(maxsize=None)
def tiny_model_path() -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="jpaged-tiny-"), "llama")
    build_tiny_hf("llama", path, vocab_size=512)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 1024
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


@functools.lru_cache(maxsize=None)
def tiny_llm(dtype: str = "float32"):
    """The tiny Llama; in bfloat16 its pool is bfloat16 too (the `cpu` backend's own write),
    with the same number of blocks."""
    from jpaged import LLM
    itemsize = 2 if dtype == "bfloat16" else 4
    return LLM(tiny_model_path(), tokenizer=NoTokenizer(), max_num_seqs=8, max_model_len=640,
               block_size=BLOCK_SIZE, kv_cache_memory=NUM_BLOCKS * PER_BLOCK * itemsize // 4,
               max_num_batched_tokens=128, preemption_mode="swap",
               swap_space=256 * PER_BLOCK * itemsize // 4, compilation_cache_dir="", dtype=dtype)


def check_engine_invariants(llm) -> None:
    """Every held block's reference count equals its holders; nothing held is free or cached-free."""
    bm = llm.block_manager
    holders: dict[int, int] = {}
    for seq in llm.scheduler.running + list(llm.scheduler.waiting):
        for block in seq.block_table:
            holders[block] = holders.get(block, 0) + 1
    assert holders == {b: c for b, c in enumerate(bm.ref_counts) if c}
    assert not (set(bm.free_blocks()) | set(bm.prefix_cache.evictable_blocks())) & set(holders)


def run_checked(llm, prompts, params):
    """`generate`, stepping by hand and checking the block invariants after every step."""
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    results = {}
    while len(results) < len(ids):
        for out in llm.step():
            if out.finished:
                results[out.request_id] = out
        check_engine_invariants(llm)
    return [results[i] for i in ids]


# Engine flags of the CLI and benchmark tests: every engine there has the same settings and
# greedy sampling, so the step shapes the first one compiles come from XLA's persistent
# cache in the others.
SMALL_ENGINE_FLAGS = ["--max-num-seqs", "4", "--max-model-len", "128", "--kv-cache-memory",
                      "8000000", "--max-num-batched-tokens", "16", "--quiet"]


# ---- the tiny OpenAI server (fixtures `tiny_server` and `client` in conftest.py) -----------------

TINY_SERVER_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=128,
                        kv_cache_memory=1 << 20)


def tiny_model_dir(root) -> str:
    """A tiny random Llama with the default model's tokenizer (so it serves text)."""
    from jpaged.models.loader import load_tokenizer, resolve_model_path
    path = os.path.join(root, "tiny")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny_hf("llama", path, vocab_size=49152)
        load_tokenizer(resolve_model_path(None)).save_pretrained(path)
    return path


def engine_state(handle):
    """(requests in the engine, its KV stats), read on the engine between steps."""
    return (handle.engine.call_utility("num_unfinished_requests", timeout=60),
            handle.engine.call_utility("kv_cache_stats", timeout=60))


def wait_idle(handle, timeout: float = 30.0):
    """Wait until the engine holds no request; return its state then."""
    deadline = time.monotonic() + timeout
    while True:
        n, kv = engine_state(handle)
        if n == 0 or time.monotonic() > deadline:
            return n, kv
        time.sleep(0.05)


def assert_pool_free(handle):
    n, kv = wait_idle(handle)
    assert n == 0, f"{n} requests still in the engine"
    assert kv["used_blocks"] == 0 and kv["free_blocks"] == kv["total_blocks"], kv


def check_normal_request(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def metric_values(url) -> dict[str, float]:
    """The server's /metrics samples (histogram buckets left out; success by finish reason)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            key = s.name + ("{" + s.labels.get("finished_reason", "") + "}"
                            if "finished_reason" in s.labels else "")
            if "le" not in s.labels:
                out[key] = out.get(key, 0.0) + s.value
    return out
