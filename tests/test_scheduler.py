"""Scheduler: budgets respected, prompts chunked, newest preempted first, nothing leaks."""
from jpaged.block_manager import BlockManager
from jpaged.config import EngineConfig
from jpaged.sampling_params import SamplingParams
from jpaged.scheduler import Scheduler
from jpaged.sequence import Request, Sequence, SequenceStatus


def _seq(n, rid="r"):
    return Sequence(Request(rid, None, [1] * n, SamplingParams(), 0.0), [1] * n, n)


def _run_step(batch):
    """What the engine does after a step: K/V now exist; a finished prompt samples a token."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)


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


def test_max_num_seqs_caps_the_running_set():
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, block_size=4)
    sched = Scheduler(cfg, BlockManager(100, 4))
    seqs = [_seq(3) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == seqs[:2]
    assert len(sched.running) == 2 and len(sched.waiting) == 3


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
