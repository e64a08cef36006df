"""Parallel sampling and copy-on-write on a tiny random Llama: n samples share the prompt's
blocks, diverge by copy-on-write, sample as if alone, and never touch each other's K/V."""
from __future__ import annotations

import numpy as np
import pytest

from jpaged import SamplingParams

from helpers import BLOCK_SIZE, check_engine_invariants, tiny_llm


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * j) % 500 + 3 for j in range(n)]


def _tokens(out):
    return [o.token_ids for o in out.outputs]


def test_parallel_sampling_shares_the_prompt_and_samples_as_if_alone():
    llm = tiny_llm()
    prompt = _prompt(1, 37)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    one = llm.generate(prompt, greedy, use_tqdm=False)[0]
    four = llm.generate(prompt, SamplingParams(n=4, temperature=0.0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0]
    assert _tokens(four) == _tokens(one) * 4  # greedy: n identical outputs

    def sampled(n, seed, best_of=None):
        return llm.generate(prompt, SamplingParams(n=n, best_of=best_of, temperature=1.0, seed=seed,
                                                   max_tokens=12, ignore_eos=True), use_tqdm=False)[0]

    a, b = sampled(4, 7), sampled(4, 7)
    assert _tokens(a) == _tokens(b)  # reproducible with a seed
    assert len({tuple(t) for t in _tokens(a)}) == 4  # independent samples
    # each sample is what a lone request with its derived seed draws
    for i in (0, 3):
        seed = 7 if i == 0 else (7 * 1_000_003 + i) & 0x7FFFFFFF
        assert _tokens(sampled(1, seed)) == [a.outputs[i].token_ids]
    # best_of: the n best of best_of samples by cumulative logprob
    best = sampled(2, 7, best_of=4)
    ranked = sorted(a.outputs, key=lambda o: -o.cumulative_logprob)[:2]
    assert _tokens(best) == [o.token_ids for o in ranked]
    assert [o.index for o in best.outputs] == [0, 1]
    assert llm.block_manager.num_used_blocks == 0


def test_shared_block_counts_follow_the_math():
    llm = tiny_llm()
    bs = BLOCK_SIZE
    L, n = 2 * bs + 5, 4  # two full prompt blocks and a partial one
    copied = llm.stats.blocks_copied
    rid = llm.add_request(_prompt(2, L), SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=2 * bs,
                                                        ignore_eos=True))
    seqs = llm.requests[rid].seqs
    llm.step()  # prefill once, fork: every block shared by all n
    stats = llm.kv_cache_stats()
    assert stats["used_blocks"] == 3 and stats["logical_blocks"] == 3 * n
    assert all(s.block_table == seqs[0].block_table for s in seqs)
    steps = 0
    while rid in llm.requests:
        llm.step()
        steps += 1
        if rid not in llm.requests:
            break
        check_engine_invariants(llm)
        computed = seqs[0].num_computed_tokens
        assert all(s.num_computed_tokens == computed for s in seqs)
        own = -(-computed // bs) - L // bs  # blocks past the full prompt blocks, one set per sample
        stats = llm.kv_cache_stats()
        assert stats["used_blocks"] == L // bs + n * own
        assert stats["logical_blocks"] == n * (L // bs + own)
        if steps == 1:  # the first decode step copied the shared partial block for n - 1 samples
            assert llm.stats.blocks_copied - copied == n - 1
    assert llm.stats.blocks_copied - copied == n - 1
    assert llm.block_manager.num_used_blocks == 0


def _kv_of(llm, seq) -> tuple[np.ndarray, np.ndarray]:
    """K and V of `seq`'s computed tokens, [position, layer, kv head, dim], read from the pool."""
    kv = llm.runner.backend.block_tokens(*llm.runner.blocks(seq.block_table))
    return tuple(np.moveaxis(x, 1, 0)[:seq.num_computed_tokens] for x in kv)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_copy_on_write_keeps_each_sequence_kv_its_own(dtype):
    llm = tiny_llm(dtype)
    assert str(llm.runner.kv_pool[0].dtype) == dtype
    L = 2 * BLOCK_SIZE + 9
    rid = llm.add_request(_prompt(3, L), SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=24,
                                                        ignore_eos=True))
    a, b = llm.requests[rid].seqs
    while a.num_output_tokens < 6:
        llm.step()
    assert a.output_token_ids[:5] != b.output_token_ids[:5]
    assert a.block_table[:2] == b.block_table[:2]  # full prompt blocks: shared
    assert a.block_table[2] != b.block_table[2]  # the partial prompt block: copied on write
    ka, va = _kv_of(llm, a)
    kb, vb = _kv_of(llm, b)
    np.testing.assert_array_equal(ka[:L], kb[:L])
    np.testing.assert_array_equal(va[:L], vb[:L])
    # each sample's K/V is exactly what computing its own tokens alone gives
    caching = llm.block_manager.prefix_cache.enabled
    llm.block_manager.prefix_cache.enabled = False  # compute everything afresh
    try:
        for seq, (k, v) in ((a, (ka, va)), (b, (kb, vb))):
            ref_id = llm.add_request(seq.token_ids[:seq.num_computed_tokens],
                                     SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
            ref = llm.requests[ref_id].seqs[0]
            llm.step()  # the prefill (the sample's next decode step may run on a later step)
            while ref.num_computed_tokens < ref.num_prompt_tokens:
                llm.step()
            kr, vr = _kv_of(llm, ref)
            np.testing.assert_allclose(k, kr[:len(k)], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(v, vr[:len(v)], rtol=1e-4, atol=1e-5)
            llm.abort_request(ref_id)
    finally:
        llm.block_manager.prefix_cache.enabled = caching
    llm.abort_request(rid)
    assert llm.block_manager.num_used_blocks == 0


def test_more_samples_than_max_num_seqs_is_an_error_not_a_hang():
    import pytest
    llm = tiny_llm()
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.add_request(_prompt(4, 5), SamplingParams(n=2, best_of=llm.config.max_num_seqs + 1))
    assert not llm.has_unfinished_requests()
