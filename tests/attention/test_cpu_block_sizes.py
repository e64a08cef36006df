"""End to end: the engine on the `cpu` backend at block sizes 1 and 256 (the ends of the
paper's Fig. 18b sweep) gives the same greedy tokens as at 16, with the C++ kernel
reading the pool at each (not the `xla` fallback).

Prompts cover one shorter than a 16-token block, ones spanning several, and one longer
than `max_num_batched_tokens` (chunked prefill over cached pages); they share prefixes,
and prefix caching is on, as by default."""
from __future__ import annotations

import jax

from jpaged import LLM, SamplingParams
from jpaged.attention import cpu as cpu_attention

from helpers import NoTokenizer, tiny_model_path

MAX_TOKENS = 12


def _generate(block_size: int):
    llm = LLM(tiny_model_path(), tokenizer=NoTokenizer(), attention_backend="cpu",
              block_size=block_size, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=32,
              kv_cache_memory=4 << 20, compilation_cache_dir="")
    assert llm.runner.backend.name == "cpu"
    assert cpu_attention.supported(block_size, llm.model_config.head_dim)
    base = [(7 * j) % 500 + 3 for j in range(40)]
    prompts = [base[:5], base[:23], [11, 12] + base[:18], base + base[:5]]  # 45 > 32: chunked
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.block_manager.num_used_blocks == 0
    return [o.outputs[0].token_ids for o in outs]


def test_block_sizes_1_and_256_match_16():
    assert jax.default_backend() == "cpu"
    expected = _generate(16)
    assert all(len(t) == MAX_TOKENS for t in expected)
    assert _generate(1) == expected
    assert _generate(256) == expected
