"""Swap preemption: a preempted group's blocks go to host memory and come back; outputs equal
recompute preemption and unpreempted runs; the host pool ends empty. Plus the jitted block
copy / gather / scatter on both pool layouts."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged import SamplingParams
from jpaged.kv_blocks import HostKVPool, copy_blocks, gather_blocks, scatter_blocks

from tiny_engine import run_checked, tiny_llm


@pytest.mark.parametrize("axis", [1, 2])  # xla/reference layout, pallas layout
def test_block_copy_gather_scatter(axis):
    rng = np.random.default_rng(0)
    shape = [3, 4, 4, 5, 6]
    shape[axis] = 10  # ten blocks
    pools = tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    take = lambda a, idx: np.take(a, idx, axis=axis)  # noqa: E731
    out = copy_blocks(tuple(jnp.asarray(p) for p in pools), [1, 2, 7], [2, 9, 1], axis)
    for got, p in zip(out, pools):  # sources read before any write: 2 gets old 1, 9 old 2, 1 old 7
        want = p.copy()
        idx = [slice(None)] * 5
        for s, d in [(1, 2), (2, 9), (7, 1)]:
            idx[axis] = d
            want[tuple(idx)] = take(p, s)
        np.testing.assert_array_equal(np.asarray(got), want)
    host = HostKVPool(out, 6, axis)
    k, v = gather_blocks(out, [9, 0, 3], axis)
    host.store([5, 0, 2], (k, v))
    befores = [np.asarray(o) for o in out]  # `out` is donated to the scatter
    back = scatter_blocks(out, [4, 6, 8], host.load([5, 0, 2]), axis)
    for got, before in zip(back, befores):
        np.testing.assert_array_equal(take(np.asarray(got), [4, 6, 8]), take(before, [9, 0, 3]))
        np.testing.assert_array_equal(take(np.asarray(got), [0, 1, 2, 3, 5, 7, 9]),
                                      take(before, [0, 1, 2, 3, 5, 7, 9]))


def test_swap_outputs_equal_recompute_and_unpreempted():
    llm = tiny_llm()
    prompts = [[(11 * i + 3 * j) % 500 + 3 for j in range(40 + 13 * i)] for i in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=110, ignore_eos=True)
    group = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=90, ignore_eos=True)
    params = [greedy, group, greedy, group, greedy, greedy]  # groups of 3 share their prompt blocks
    sched, bm = llm.scheduler, llm.block_manager
    assert llm.config.preemption_mode == "swap"
    swaps = sched.num_swap_outs
    swapped = [[o.token_ids for o in r.outputs] for r in run_checked(llm, prompts, params)]
    assert sched.num_swap_outs > swaps and llm.stats["blocks_swapped"] > 0
    assert bm.num_host_used_blocks == 0 and llm.kv_cache_stats()["swapped_blocks"] == 0
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
    assert bm.num_used_blocks == 0 and bm.num_host_used_blocks == 0
