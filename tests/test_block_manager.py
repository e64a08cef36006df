"""Block manager invariants under random allocate / grow / fork / free sequences."""
from hypothesis import given, settings, strategies as st

from jpaged.block_manager import BlockManager
from jpaged.sampling_params import SamplingParams
from jpaged.sequence import Request, Sequence


def _seq(n_tokens=1):
    req = Request("r", None, [1] * n_tokens, SamplingParams(), 0.0)
    return Sequence(req, [1] * n_tokens, n_tokens)


def check_invariants(bm: BlockManager, live: list[Sequence]):
    holders = {}
    for seq in live:
        for block in seq.block_table:
            holders[block] = holders.get(block, 0) + 1
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    # every used block is held by exactly as many live sequences as its reference count
    assert holders == {b: c for b, c in enumerate(bm.ref_counts) if c}
    assert len(set(bm._free)) == bm.num_free_blocks  # no block twice on the free list
    assert not set(bm._free) & set(holders)


ops = st.lists(st.tuples(st.sampled_from(["new", "grow", "fork", "free"]),
                         st.integers(0, 1000), st.integers(1, 40)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 24), st.sampled_from([1, 4, 16]))
def test_random_ops_keep_invariants(ops, num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    live: list[Sequence] = []
    for op, pick, n in ops:
        if op == "new" or not live:
            seq = _seq()
            if bm.can_grow(seq, n):
                bm.grow(seq, n)
                live.append(seq)
            continue
        seq = live[pick % len(live)]
        if op == "grow":
            target = len(seq.block_table) * block_size + n
            if bm.can_grow(seq, target):
                bm.grow(seq, target)
                assert len(seq.block_table) == -(-target // block_size)
        elif op == "fork":
            child = _seq()
            bm.fork(seq, child)
            live.append(child)
        else:
            bm.free(seq)
            live.remove(seq)
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks and not any(bm.ref_counts)  # nothing leaks


def test_grow_beyond_free_raises_and_changes_nothing():
    bm = BlockManager(2, 4)
    seq = _seq()
    assert not bm.can_grow(seq, 9)
    try:
        bm.grow(seq, 9)
    except RuntimeError as e:
        assert "out of KV blocks" in str(e)
    else:
        raise AssertionError("grow past the pool must raise")
    assert bm.num_free_blocks == 2 and seq.block_table == []
