"""Prefix caching on a tiny random Llama: a cached prefix is not prefilled again, outputs do
not change, and evicting cached blocks under pressure never touches a block in use."""
from __future__ import annotations

import contextlib

import pytest

from jpaged import SamplingParams

from helpers import BLOCK_SIZE, run_checked, tiny_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@contextlib.contextmanager
def _caching(llm, enabled: bool):
    bm = llm.block_manager
    before = bm.prefix_cache.enabled
    bm.reset_prefix_cache()
    bm.prefix_cache.enabled = enabled  # the same as LLM(enable_prefix_caching=...), without a rebuild
    try:
        yield
    finally:
        bm.prefix_cache.enabled = before


def _prefilled(llm, prompt, params=GREEDY):
    before = llm.stats.prefill_tokens
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    return out, llm.stats.prefill_tokens - before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shared_512_token_prefix_prefills_only_the_suffix(dtype):
    llm = tiny_llm(dtype)
    prefix = [(13 * j) % 500 + 3 for j in range(512)]
    first, second = prefix + [5] * 20, prefix + [9, 8, 7, 6] * 5
    with _caching(llm, False):
        want = [_prefilled(llm, p)[0] for p in (first, second)]
    bm = llm.block_manager
    with _caching(llm, True):
        queries, hits = bm.prefix_cache.query_tokens, bm.prefix_cache.hit_tokens
        out1, n1 = _prefilled(llm, first)
        assert n1 == 532 and llm.kv_cache_stats()["cached_blocks"] == 33  # every full block kept
        out2, n2 = _prefilled(llm, second)
        assert n2 == 20  # only the suffix
        out3, n3 = _prefilled(llm, first)  # fully cached: only the last (partial) block's tokens
        assert n3 == 532 - 33 * BLOCK_SIZE
        assert [out1, out2] == want and out3 == want[0]
        assert (bm.prefix_cache.hit_tokens - hits, bm.prefix_cache.query_tokens - queries) == (512 + 528, 3 * 532)
        stats = llm.kv_cache_stats()
        assert stats["used_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"]
        assert 0 < stats["prefix_cache_hit_rate"] <= 1


def test_a_prefix_shared_by_concurrent_requests_is_stored_once():
    llm = tiny_llm()
    system = [(17 * j) % 500 + 3 for j in range(6 * BLOCK_SIZE)]
    prompts = [system + [i + 3] * 10 for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=3 * BLOCK_SIZE, ignore_eos=True)
    with _caching(llm, True):
        rids = [llm.add_request(p, params) for p in prompts]
        seqs = [llm.requests[r].seqs[0] for r in rids]
        while any(s.num_output_tokens == 0 for s in seqs):  # chunked prefill: one or two per step
            llm.step()
        llm.step()  # a decode step: its scheduling registers the blocks just filled
        # requests admitted after the first prompt's blocks were cached took them; those
        # prefilled alongside it computed their own copy, which was then deduplicated
        assert llm.block_manager.prefix_cache.hit_tokens > 0
        tables = [s.block_table for s in seqs]
        assert all(t[:6] == tables[0][:6] for t in tables)
        assert llm.kv_cache_stats()["used_blocks"] == 6 + sum(len(t) - 6 for t in tables)
        while llm.has_unfinished_requests():
            llm.step()


def test_eviction_under_pressure_keeps_outputs_and_blocks_in_use():
    llm = tiny_llm()
    families = [[(19 * j + 7 * f) % 500 + 3 for j in range(3 * BLOCK_SIZE)] for f in range(2)]
    prompts = [families[i % 2] + [(i * 37 + j) % 500 + 3 for j in range(30 + 11 * i)] for i in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * len(prompts)
    with _caching(llm, False):
        want = [o.outputs[0].token_ids for o in run_checked(llm, prompts, params)]
    bm = llm.block_manager
    mode = llm.config.preemption_mode
    llm.config.preemption_mode = "recompute"
    with _caching(llm, True):
        filler = [[(23 * j + i) % 500 + 3 for j in range(250)] for i in range(4)]
        run_checked(llm, filler, [SamplingParams(max_tokens=1)] * 4)  # fill the cache
        assert bm.num_cached_blocks >= 4 * (250 // BLOCK_SIZE) - 1
        evictions = bm.prefix_cache.num_evictions
        got = [o.outputs[0].token_ids for o in run_checked(llm, prompts, params)]  # checks every step
        assert bm.prefix_cache.num_evictions > evictions
        assert got == want
    llm.config.preemption_mode = mode
