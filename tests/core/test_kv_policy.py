"""KV allocation policies (the vLLM paper's baselines): each reserves exactly what its formula
says, as one contiguous run; the memory breakdown adds up to what the block manager holds;
static batches admit nobody into a running batch; without sharing a fork copies every block."""
import pytest

from jpaged.config import EngineConfig
from jpaged.core.block_manager import BlockManager
from jpaged.core.kv_alloc_policy import make_policy
from jpaged.core.scheduler import Scheduler
from jpaged.core.sequence import Request, Sequence
from jpaged.sampling_params import SamplingParams

BS, MAX_LEN = 4, 64


def _seq(prompt: int, max_tokens: int, rid: str = "r") -> Sequence:
    tokens = [1] * prompt
    return Sequence(Request(rid, None, tokens, SamplingParams(max_tokens=max_tokens), 0.0), list(tokens), prompt)


def _run_step(batch):
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)


def _sched(policy: str, num_blocks: int = 200, **cfg):
    config = EngineConfig(block_size=BS, max_num_batched_tokens=256, max_num_seqs=16,
                          kv_policy=policy, **cfg)
    bm = BlockManager(num_blocks, BS, policy=make_policy(policy, BS, MAX_LEN),
                      share_blocks=config.enable_block_sharing)
    return Scheduler(config, bm), bm


# (prompt, max_tokens) -> blocks reserved at admission, per policy (BS=4, max_model_len=64)
CASES = [(5, 3), (5, 12), (13, 20), (30, 34), (1, 1)]
WANT = {
    "paged": [2, 2, 4, 8, 1],                 # the prompt's blocks only: ceil(prompt / 4)
    "orca-oracle": [2, 5, 9, 16, 1],          # ceil((prompt + max_tokens) / 4)
    "orca-pow2": [2, 8, 16, 16, 1],           # ceil(min(pow2(prompt + max_tokens), 64) / 4)
    "orca-max": [16] * 5,                     # 64 / 4
    "static": [16] * 5,
}


@pytest.mark.parametrize("policy", list(WANT))
def test_each_policy_reserves_what_its_formula_says_in_one_contiguous_run(policy):
    sched, bm = _sched(policy)
    seqs = [_seq(p, m, f"r{i}") for i, (p, m) in enumerate(CASES)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()
    assert batch.seqs == seqs
    assert [len(s.block_table) for s in seqs] == WANT[policy]
    if policy != "paged":
        for s in seqs:
            assert s.block_table == list(range(s.block_table[0], s.block_table[0] + len(s.block_table)))
    assert bm.num_used_blocks == sum(WANT[policy])
    # generating every token never takes another block under a reserving policy
    _run_step(batch)
    while sched.running:
        batch = sched.schedule()
        _run_step(batch)
        for s in list(sched.running):
            assert len(s.block_table) * BS >= s.num_computed_tokens
            if s.num_output_tokens >= s.request.params.max_tokens:
                sched.remove(s)
        if policy != "paged":
            assert bm.num_used_blocks == sum(len(s.block_table) for s in sched.running)
            assert all(len(s.block_table) == WANT[policy][seqs.index(s)] for s in sched.running)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 200


def test_a_request_waits_for_a_contiguous_run_while_enough_blocks_are_free():
    sched, bm = _sched("orca-oracle", num_blocks=12)
    a, b, c = _seq(8, 8, "a"), _seq(8, 8, "b"), _seq(8, 8, "c")  # 4 blocks each
    for s in (a, b, c):
        sched.add(s)
    _run_step(sched.schedule())
    assert [s.block_table for s in (a, b, c)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    sched.remove(a)
    sched.remove(c)  # 8 blocks free, in two runs of 4
    big = _seq(10, 10, "big")  # 5 blocks
    sched.add(big)
    batch = sched.schedule()
    assert big not in batch.seqs and big in sched.waiting
    assert bm.num_free_blocks == 8 and bm.largest_free_run() == 4
    slots = bm.memory_breakdown(sched.running, MAX_LEN, sched.next_to_admit())
    assert slots["external_fragmentation"] == 8 * BS and slots["free"] == 0
    # b: 9 tokens computed of its final 16; its 4 blocks hold 16 slots
    assert slots["token_states"] == b.num_computed_tokens == 8
    assert slots["reserved"] == 16 - 8 and slots["internal_fragmentation"] == 0
    assert sum(slots.values()) == 12 * BS
    sched.remove(b)
    assert big in sched.schedule().seqs and big.block_table == [0, 1, 2, 3, 4]


def test_memory_breakdown_counts_internal_fragmentation_and_shared_blocks_once():
    bm = BlockManager(20, BS, policy=make_policy("orca-max", BS, 32))
    seq = _seq(5, 3)  # final length 8: of its 32 reserved slots, 24 are never filled
    bm.append(seq, 5)
    seq.num_computed_tokens = 5
    slots = bm.memory_breakdown([seq], 32)
    assert slots == {"token_states": 5, "reserved": 3, "internal_fragmentation": 24,
                     "external_fragmentation": 0, "free": 12 * BS}
    paged = BlockManager(20, BS)
    parent, child = _seq(6, 10), _seq(6, 10)
    paged.append(parent, 6)
    parent.num_computed_tokens = 6
    paged.fork(parent, child)
    child.num_computed_tokens = 6
    slots = paged.memory_breakdown([parent, child], 32)
    assert slots["token_states"] == 6 and slots["reserved"] == 2  # 2 blocks, counted once
    assert slots["internal_fragmentation"] == 0 and slots["free"] == 18 * BS


def test_static_batches_admit_nobody_until_the_whole_batch_ends():
    sched, bm = _sched("static", num_blocks=64)
    first = [_seq(4, 2, "a"), _seq(4, 6, "b")]
    for s in first:
        sched.add(s)
    _run_step(sched.schedule())
    late = _seq(4, 2, "late")
    sched.add(late)
    steps = 0
    while any(s in sched.running for s in first):
        batch = sched.schedule()
        assert late not in batch.seqs
        _run_step(batch)
        steps += 1
        for s in list(sched.running):
            if s.num_output_tokens >= s.request.params.max_tokens:
                sched.remove(s)
    assert steps == 5  # b's 5 more tokens; a finished after 1 but late still waited
    assert late in sched.schedule().seqs


def test_orca_policies_refuse_nothing_that_paged_runs():
    with pytest.raises(ValueError, match="kv_policy"):
        EngineConfig(kv_policy="buddy")
    assert make_policy("orca-pow2", 16, 100).reserved_tokens(_seq(60, 10)) == 100  # capped


@pytest.mark.parametrize("prompt", [6, 8])  # ends inside a block; on a block boundary
def test_without_sharing_a_fork_copies_every_block_at_its_first_write(prompt):
    for share, want in ((True, 1 if prompt % BS else 0), (False, 2)):
        bm = BlockManager(20, BS, share_blocks=share)
        parent, child = _seq(prompt, 4), _seq(prompt, 4)
        bm.append(parent, prompt)
        parent.num_computed_tokens = prompt
        bm.fork(parent, child)
        child.num_computed_tokens = prompt
        copies = bm.append(child, prompt + 1)
        assert len(copies) == want, share
        assert bm.append(parent, prompt + 1) == []  # the other holder keeps the originals
        shared = set(parent.block_table) & set(child.block_table)
        assert bool(shared) == share
