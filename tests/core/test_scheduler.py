"""Scheduler: budgets respected, prompts chunked, newest preempted first, samples forked, copy-on-write
and swap operations listed, idle beams never deadlock, nothing leaks."""
import pytest

from jpaged.core.block_manager import BlockManager
from jpaged.config import EngineConfig
from jpaged.sampling_params import SamplingParams
from jpaged.core.scheduler import Scheduler
from jpaged.core.sequence import Request, Sequence, SequenceStatus


def _seq(n, rid="r", client=None):
    return Sequence(Request(rid, None, [1] * n, SamplingParams(), 0.0, client_request_id=client), [1] * n, n)


def _run_step(batch):
    """What the engine does after a step: K/V now exist; a finished prompt samples a token."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)


def _first_step_beside_decodes(sched, num_decode, prompts):
    """New tokens per sequence of the first step after `prompts` arrive while `num_decode`
    running sequences decode (their 3-token prompts prefilled first)."""
    running = [_seq(3, f"d{i}") for i in range(num_decode)]
    for seq in running:
        sched.add(seq)
    while running and any(s.num_uncomputed_tokens > 1 for s in running):
        _run_step(sched.schedule())
    for i, n in enumerate(prompts):
        sched.add(_seq(n, f"p{i}"))
    return sched.schedule().num_new_tokens


def test_prefill_is_chunked_within_the_token_budget():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, block_size=4)
    sched = Scheduler(cfg, BlockManager(100, 4))
    long, short = _seq(70), _seq(10)
    sched.add(long)
    sched.add(short)
    chunks = []
    while True:
        batch = sched.schedule()
        assert batch.num_tokens <= 32
        if not batch.is_prefill:
            break
        chunks.append(list(zip([s is long for s in batch.seqs], batch.num_new_tokens)))
        _run_step(batch)
    assert chunks == [[(True, 32)], [(True, 32)], [(True, 6), (False, 10)]]
    assert batch.seqs == [long, short] and batch.num_new_tokens == [1, 1]


@pytest.mark.parametrize("num_decode,prompts,want", [
    (10, [128], [118]),          # 138 tokens would run a 256-token step: 128 instead
    (10, [128, 128], [128, 118]),  # 266 -> 256
    (0, [128] * 5, [128] * 4),   # 640 -> 512; the fifth prompt waits a step
    (120, [20], [20]),           # cutting to 128 would keep fewer than half: a 256 step
    (10, [200], [200]),          # 210 is far past 128: no cut
    (10, [118], [118]),          # exactly a bucket
])
def test_prefill_is_cut_back_to_a_token_bucket(num_decode, prompts, want):
    cfg = EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048, block_size=4,
                       max_mixed_step_tokens=2048)  # the cut alone
    sched = Scheduler(cfg, BlockManager(2000, 4), token_buckets=[16, 32, 64, 128, 256, 512, 1024, 2048])
    assert _first_step_beside_decodes(sched, num_decode, prompts) == [1] * num_decode + want
    assert Scheduler(cfg, BlockManager(2000, 4)).token_buckets == []  # no buckets: no cut


@pytest.mark.parametrize("num_decode,prompts,want", [
    (10, [128], [118]),      # 138: 10 past 128, the next bucket 192: cut
    (10, [160], [160]),      # 170: 42 past 128, more than half way to 192: a 192 step
    (0, [300], [256]),       # 300: 44 past 256, less than half way to 384: cut
    (0, [330], [330]),       # 330: more than half way: a 384 step
])
def test_the_cut_follows_a_finer_bucket_ladder(num_decode, prompts, want):
    cfg = EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048, block_size=4,
                       max_mixed_step_tokens=2048)
    sched = Scheduler(cfg, BlockManager(2000, 4),
                      token_buckets=[128, 192, 256, 384, 512, 768, 1024, 1536, 2048])
    assert _first_step_beside_decodes(sched, num_decode, prompts) == [1] * num_decode + want


@pytest.mark.parametrize("num_decode,prompts,cap,want", [
    (10, [128] * 3, None, [128, 118]),        # a queue (384 tokens): twice the smallest bucket, 256
    (10, [128] * 2, None, [118]),             # a short queue (256): one smallest bucket, 128
    (10, [100, 100, 57], None, [100, 100, 46]),  # 257 waiting: a queue already, 256
    (10, [128] * 2, 256, [128, 118]),         # an explicit cap is fixed, whatever the queue
    (10, [128] * 8, None, [128, 128, 128, 118]),  # 1,024 waiting: drained in about two 512 steps
    (10, [128] * 32, None, [128] * 15 + [118]),   # a burst: steps as long as the budget
    (10, [128] * 3, 2048, [128, 128, 128]),   # a cap as large as the budget: all three now
    (0, [200, 200], None, [200, 200]),        # no decode rows waiting: no cap
    (200, [64], None, [56]),                  # half the cap stays for prompts (then the cut)
    (10, [128] * 3, 64, [54]),                # an explicit cap: 10 decode rows + 54 prompt tokens
])
def test_a_step_with_decode_rows_is_capped(num_decode, prompts, cap, want):
    """Running sequences wait for the whole step: a mixed step holds at most
    max_mixed_step_tokens, and the prompts beyond it go in the next steps."""
    cfg = EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048, block_size=4,
                       max_mixed_step_tokens=cap)
    sched = Scheduler(cfg, BlockManager(2000, 4), token_buckets=[128, 256, 512, 1024, 2048])
    assert _first_step_beside_decodes(sched, num_decode, prompts) == [1] * num_decode + want


def test_two_prompts_arriving_together_under_a_light_load_start_one_after_the_other():
    """The default cap follows the queue: with two 128-token prompts waiting beside running
    requests, each step holds one 128-token bucket, so the first prompt's first token comes
    after one short step (the cut's 10-token tail goes first in the next one)."""
    cfg = EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048, block_size=4)
    sched = Scheduler(cfg, BlockManager(2000, 4), token_buckets=[128, 256, 512, 1024, 2048])
    running = [_seq(3, f"d{i}") for i in range(10)]
    for seq in running:
        sched.add(seq)
    _run_step(sched.schedule())
    first, second = _seq(128, "first"), _seq(128, "second")
    sched.add(first)
    sched.add(second)
    steps = []
    while second.num_computed_tokens < 128:
        batch = sched.schedule()
        assert batch.num_tokens <= 128
        steps.append([n for s, n in zip(batch.seqs, batch.num_new_tokens)
                      if s in (first, second) and s.num_computed_tokens < 128])
        _run_step(batch)
    assert steps == [[118], [10, 108], [20]]


@pytest.mark.parametrize("num_decode,prompts,want", [
    (10, [128], [128]),            # 138 tokens: whole, no 10-token tail for the next step
    (60, [200], [200]),            # whole beside 60 decode rows
    (10, [128, 128], [128, 128]),  # both now, not one after the other
    (10, [600], [600]),            # nothing cut back to 384 or 512
    (10, [128] * 8, [128] * 8),    # 1,024 waiting: all in one step
    (48, [1000, 1000, 500], [1000, 1000]),  # the step budget (2,048): the rest waits
])
def test_with_free_padding_nothing_is_cut_back_to_a_bucket(num_decode, prompts, want):
    """Where the runner's dense layers skip padding rows (the CPU's packed matmul), a cut to
    a bucket would only add a step that the prompt's first token waits for, and a CPU
    step's cost per token falls as it grows: what waits goes whole beside the decode rows,
    up to the step budget."""
    cfg = EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048, block_size=4)
    sched = Scheduler(cfg, BlockManager(2000, 4), token_buckets=[128, 192, 256, 384, 512, 768, 1024],
                      padding_is_free=True)
    assert not sched.follows_queue and sched.mixed_step_tokens == 2048
    assert _first_step_beside_decodes(sched, num_decode, prompts) == [1] * num_decode + want


def test_decodes_ride_along_with_a_new_prompt_in_one_mixed_step():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    sched = Scheduler(cfg, BlockManager(100, 4))
    a, b, late = _seq(5, "a"), _seq(6, "b"), _seq(30, "late")
    sched.add(a)
    sched.add(b)
    _run_step(sched.schedule())  # both prompts in one prefill step
    sched.add(late)
    batch = sched.schedule()  # a and b decode; late's first chunk takes the rest of the budget
    assert batch.is_prefill and batch.num_decode == 2
    assert batch.seqs == [a, b, late] and batch.num_new_tokens == [1, 1, 14]
    _run_step(batch)
    batch = sched.schedule()
    assert batch.seqs == [a, b, late] and batch.num_new_tokens == [1, 1, 14]
    _run_step(batch)
    batch = sched.schedule()  # late's last 2 prompt tokens
    assert batch.num_new_tokens == [1, 1, 2] and batch.num_decode == 2
    _run_step(batch)
    batch = sched.schedule()  # all three decode: a plain decode step
    assert not batch.is_prefill and sorted(s.request.request_id for s in batch.seqs) == ["a", "b", "late"]


def test_a_step_that_preempts_admits_nothing():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    bm = BlockManager(5, 4)
    sched = Scheduler(cfg, bm)
    sched.watermark_blocks = 0
    a, b = _seq(8, "a"), _seq(8, "b")
    sched.add(a)
    sched.add(b)
    _run_step(sched.schedule())
    sched.add(_seq(1, "tiny"))  # would fit in the block b's preemption frees
    batch = sched.schedule()
    assert sched.num_preemptions == 1 and batch.seqs == [a] and not batch.is_prefill
    assert [s.request.request_id for s in sched.waiting] == ["b", "tiny"]


def test_max_num_seqs_caps_the_running_set():
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, block_size=4)
    sched = Scheduler(cfg, BlockManager(100, 4))
    seqs = [_seq(3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == seqs[:2]
    assert len(sched.running) == 2 and len(sched.waiting) == 3


def test_client_requests_are_admitted_in_turns():
    """A client request of many prompts does not hold up one that comes after it: each
    admits in turn; requests of one prompt each stay first come, first served."""
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, block_size=4)
    sched = Scheduler(cfg, BlockManager(100, 4))
    big = [_seq(3, f"big-{i}", client="big") for i in range(6)]
    small, single = _seq(3, "small"), _seq(3, "single")
    for s in big + [small, single]:
        sched.add(s)
    admitted = []
    while sched.has_unfinished():
        batch = sched.schedule()
        admitted += [s for s, n in zip(batch.seqs, batch.num_new_tokens) if n == 3]
        _run_step(batch)
        for s in list(sched.running):  # each finishes after its prompt: the slot frees up
            if s.num_uncomputed_tokens == 1:
                sched.remove(s)
    assert admitted == [big[0], small, single, big[1], big[2], big[3], big[4], big[5]]


def test_a_preempted_sequence_keeps_its_place_among_client_turns():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    sched = Scheduler(cfg, BlockManager(100, 4))
    victim = _seq(3, "v", client="big")
    for s in [_seq(3, "a", client="other"), _seq(3, "b", client="big")]:
        sched.add(s)
    sched.waiting.appendleft(victim)  # where a recompute preemption queues it
    victim.preempted = True
    sched._last_turn["big"] = 5  # "big" was served last
    assert [s.request.request_id for s in sched._admission_order()] == ["v", "a", "b"]


def test_decode_preempts_the_newest_and_requeues_it_first():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    bm = BlockManager(5, 4)  # 20 slots
    sched = Scheduler(cfg, bm)
    sched.watermark_blocks = 0
    a, b = _seq(8, "a"), _seq(8, "b")
    sched.add(a)
    sched.add(b)
    _run_step(sched.schedule())  # both prefilled: 4 blocks used, each has 9 tokens
    batch = sched.schedule()  # decode: a needs a 3rd block (the last free), b would need a 6th
    assert batch.seqs == [a] and not batch.is_prefill
    assert sched.num_preemptions == 1 and b.status is SequenceStatus.WAITING
    assert list(sched.waiting) == [b] and b.block_table == [] and b.num_computed_tokens == 0
    assert bm.num_used_blocks == 3
    sched.remove(a)
    assert bm.num_free_blocks == 5


def _group(n_prompt, n, rid="g"):
    """A request with n samples, as the engine queues it: one sequence, n - 1 forks pending."""
    req = Request(rid, None, [1] * n_prompt, SamplingParams(n=n), 0.0)
    seqs = [Sequence(req, [1] * n_prompt, n_prompt, index=i) for i in range(n)]
    req.seqs = seqs
    seqs[0].pending_forks = seqs[1:]
    return seqs


def test_samples_fork_with_the_last_prompt_chunk_and_copy_on_write():
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=16, block_size=4)
    bm = BlockManager(40, 4)
    sched = Scheduler(cfg, bm)
    parent, *children = seqs = _group(22, 3)
    sched.add(parent)
    batch = sched.schedule()  # first chunk: no forks yet
    assert batch.seqs == [parent] and batch.num_new_tokens == [16]
    _run_step(batch)
    batch = sched.schedule()  # last chunk: the samples join with 0 tokens, sharing every block
    assert batch.seqs == seqs and batch.num_new_tokens == [6, 0, 0]
    assert all(s.block_table == parent.block_table for s in seqs) and bm.num_used_blocks == 6
    assert all(c.num_computed_tokens == 22 for c in children) and not batch.blocks_to_copy
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        s.token_ids.append(7)  # each sample draws its first token
    partial = parent.block_table[5]
    batch = sched.schedule()  # decode: the shared partial block is copied for all but one
    assert not batch.is_prefill and batch.seqs == seqs
    assert len(batch.blocks_to_copy) == 2 and all(src == partial for src, _ in batch.blocks_to_copy)
    assert children[-1].block_table[5] == partial  # the last holder writes in place
    assert all(s.block_table[:5] == parent.block_table[:5] for s in seqs)
    assert bm.num_used_blocks == 5 + 3


def test_group_admission_counts_every_sample_against_max_num_seqs():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    sched = Scheduler(cfg, BlockManager(40, 4))
    one, group = _seq(3, "one"), _group(3, 4, "g")
    sched.add(one)
    sched.add(group[0])
    batch = sched.schedule()
    assert batch.seqs == [one] and list(sched.waiting) == [group[0]]  # 1 + 4 > 4


def test_prefix_cache_hit_skips_the_cached_blocks():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4)
    bm = BlockManager(20, 4, enable_prefix_caching=True)
    sched = Scheduler(cfg, bm)
    first = Sequence(Request("a", None, [], SamplingParams(), 0.0), list(range(14)), 14)
    sched.add(first)
    _run_step(sched.schedule())
    cached = first.block_table[:3]
    sched.remove(first)  # its 3 full blocks stay cached
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == 20
    second = Sequence(Request("b", None, [], SamplingParams(), 0.0), list(range(12)) + [50, 51], 14)
    sched.add(second)
    batch = sched.schedule()
    assert batch.num_new_tokens == [2] and second.num_computed_tokens == 12
    assert second.block_table[:3] == cached and bm.prefix_cache.hit_rate == 12 / 28


def test_swap_preemption_moves_a_group_out_and_back():
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, preemption_mode="swap")
    bm = BlockManager(9, 4, num_host_blocks=10)
    sched = Scheduler(cfg, bm)
    sched.watermark_blocks = 0
    a = _seq(8, "a")
    group = _group(6, 2, "g")
    sched.add(a)
    sched.add(group[0])
    batch = sched.schedule()  # a: 2 blocks; the group: 2 shared blocks
    assert batch.seqs == [a] + group
    _run_step(batch)
    for s in group[1:]:
        s.token_ids.append(7)
    for _ in range(6):  # decode until a cannot grow: the group (newest) is swapped out
        batch = sched.schedule()
        if sched.swapped:
            break
        _run_step(batch)
    assert sched.swapped and list(sched.swapped[0]) == group and batch.blocks_to_swap_out
    assert all(s.status is SequenceStatus.SWAPPED and not s.block_table for s in group)
    shared = {h for _, h in batch.blocks_to_swap_out}
    assert bm.swap_space.num_used_blocks == len(shared) < sum(len(s.host_block_table) for s in group)
    assert batch.seqs == [a]
    sched.remove(a)  # room again: the group comes back before anything else runs
    batch = sched.schedule()
    assert batch.blocks_to_swap_in and {h for h, _ in batch.blocks_to_swap_in} == shared
    assert batch.seqs == group and bm.swap_space.num_used_blocks == 0
    assert group[0].block_table[0] == group[1].block_table[0]  # still shared
    for s in group:
        sched.remove(s)
    assert bm.num_free_blocks == 9


def test_idle_beams_give_way_to_a_held_up_sibling():
    import types
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4)
    bm = BlockManager(6, 4)
    sched = Scheduler(cfg, bm)
    sched.watermark_blocks = 0
    beam = types.SimpleNamespace(width=2)
    g = Request("g", None, [], SamplingParams(), 0.0, beam=beam)
    h = Request("h", None, [], SamplingParams(), 0.0, beam=beam)
    idle_g, idle_h = Sequence(g, [1] * 9, 8), Sequence(h, [1] * 9, 8)
    for s in (idle_g, idle_h):  # beams that computed everything and wait for their siblings
        bm.grow(s, 9)
        s.num_computed_tokens = 9
        s.status = SequenceStatus.RUNNING
        sched.running.append(s)
    held = Sequence(g, [1] * 10, 8)  # idle_g's sibling, preempted: needs 3 blocks, none free
    sched.add(held)
    batch = sched.schedule()
    assert batch.seqs == [held] and idle_h.status is SequenceStatus.WAITING
    assert list(sched.waiting) == [idle_h] and sched.num_preemptions == 1
    # a group that cannot fit at all is an error, not a hang
    sched.remove(idle_h)
    sched.remove(held)
    lone = Sequence(g, [1] * 30, 8)
    sched.add(lone)
    batch = sched.schedule()
    assert batch.num_new_tokens == [12]  # a first chunk fits, then nothing more can
    _run_step(batch)
    with pytest.raises(RuntimeError, match="does not fit"):
        sched.schedule()


def test_samples_fork_when_the_last_prompt_chunk_is_one_token():
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=16, block_size=4)
    sched = Scheduler(cfg, BlockManager(40, 4))
    parent, child = seqs = _group(17, 2)
    sched.add(parent)
    _run_step(sched.schedule())  # 16 of 17 prompt tokens
    batch = sched.schedule()  # the last token goes through a prefill step, with the fork
    assert batch.is_prefill and batch.seqs == seqs and batch.num_new_tokens == [1, 0]
    assert child.block_table == parent.block_table
