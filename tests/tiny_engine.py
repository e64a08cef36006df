"""One tiny random Llama engine shared by the sharing / prefix-cache / swap / beam tests.

Building and compiling an engine dominates those tests' time on the CPU, so they share
one (per process), built once: block_size 16, 64 blocks (1,024 token slots), up to 8
sequences, prefill chunks of 128 tokens, max_model_len 640 (the model's position limit is
raised to 1,024: RoPE has no learned positions), preemption by swap with room for 256
host blocks. Tests that need recompute set `llm.config.preemption_mode` and restore it.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

from conftest import build_tiny_hf

BLOCK_SIZE = 16
NUM_BLOCKS = 64
PER_BLOCK = 2 * 3 * BLOCK_SIZE * 2 * 16 * 4  # K+V, layers, block, kv heads, head dim, float32


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
def tiny_llm():
    from jpaged import LLM
    return LLM(tiny_model_path(), tokenizer=NoTokenizer(), max_num_seqs=8, max_model_len=640,
               block_size=BLOCK_SIZE, kv_cache_memory=NUM_BLOCKS * PER_BLOCK,
               max_num_batched_tokens=128, preemption_mode="swap", swap_space=256 * PER_BLOCK,
               compilation_cache_dir="")


def check_engine_invariants(llm) -> None:
    """Every held block's reference count equals its holders; nothing held is free or cached-free."""
    bm = llm.block_manager
    holders: dict[int, int] = {}
    for seq in llm.scheduler.running + list(llm.scheduler.waiting):
        for block in seq.block_table:
            holders[block] = holders.get(block, 0) + 1
    assert holders == {b: c for b, c in enumerate(bm.ref_counts) if c}
    assert not (set(bm._free) | set(bm._evictable)) & set(holders)


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
