"""Swap preemption: a preempted group's blocks go to host memory and come back; outputs equal
recompute preemption and unpreempted runs; the host pool ends empty. Float32 and bfloat16
pools."""
from __future__ import annotations

import pytest

from jpaged import SamplingParams

from helpers import run_checked, tiny_llm


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swap_outputs_equal_recompute_and_unpreempted(dtype):
    llm = tiny_llm(dtype)
    assert llm.kv_cache_stats()["total_blocks"] == 64 and str(llm.runner.kv_pool[0].dtype) == dtype
    prompts = [[(11 * i + 3 * j) % 500 + 3 for j in range(40 + 13 * i)] for i in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=110, ignore_eos=True)
    group = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=90, ignore_eos=True)
    params = [greedy, group, greedy, group, greedy, greedy]  # groups of 3 share their prompt blocks
    sched, bm = llm.scheduler, llm.block_manager
    assert llm.config.preemption_mode == "swap"
    swaps = sched.num_swap_outs
    swapped = [[o.token_ids for o in r.outputs] for r in run_checked(llm, prompts, params)]
    assert sched.num_swap_outs > swaps and llm.stats.blocks_swapped > 0
    assert bm.swap_space.num_used_blocks == 0 and llm.kv_cache_stats()["swapped_blocks"] == 0
    llm.config.preemption_mode = "recompute"
    try:
        preemptions = sched.num_preemptions
        recomputed = [[o.token_ids for o in r.outputs] for r in run_checked(llm, prompts, params)]
        assert sched.num_preemptions > preemptions
    finally:
        llm.config.preemption_mode = "swap"
    assert recomputed == swapped
    preemptions = sched.num_preemptions
    halves = [llm.generate(prompts[h:h + 3], params[h:h + 3], use_tqdm=False) for h in (0, 3)]
    assert sched.num_preemptions == preemptions  # each half fits: nothing preempted
    assert [[o.token_ids for o in r.outputs] for half in halves for r in half] == swapped
    assert bm.num_used_blocks == 0 and bm.swap_space.num_used_blocks == 0
