"""Every KV allocation policy (and block sharing off) gives the same greedy tokens: they
change only where K/V lives, never what is computed."""
from __future__ import annotations

import numpy as np
import pytest

from jpaged import LLM, SamplingParams

ENGINE = dict(max_num_seqs=4, max_model_len=128, kv_cache_memory=2_000_000,
              max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [{"prompt_token_ids": rng.integers(100, 49000, n).tolist()} for n in (3, 40, 17, 70, 9, 33)]


def _generate(model, prompts, **engine):
    llm = LLM(model, **ENGINE, **engine)
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (12, 5, 20, 9, 16, 7)]
    out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    parallel = llm.generate(prompts[1:3], SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=6),
                            use_tqdm=False)
    assert llm.block_manager.num_used_blocks == 0  # nothing leaks
    return out, [[c.token_ids for c in o.outputs] for o in parallel], llm


def test_greedy_tokens_are_identical_under_every_policy(tiny_text_model, prompts):
    want, want_parallel, llm = _generate(tiny_text_model, prompts)
    assert llm.stats.blocks_copied > 0  # the samples shared blocks and copied on write
    for engine in ({"kv_policy": "orca-max"}, {"kv_policy": "orca-pow2"},
                   {"kv_policy": "orca-oracle"}, {"kv_policy": "static"},
                   {"enable_block_sharing": False}):
        got, got_parallel, llm = _generate(tiny_text_model, prompts, **engine)
        assert got == want, engine
        assert got_parallel == want_parallel, engine
