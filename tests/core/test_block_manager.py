"""Block manager invariants under random allocate / grow / fork / copy-on-write / prefix-cache
hit / evict / swap sequences, checked against a model of the pool's contents."""
from hypothesis import event, given, settings, strategies as st

from jpaged.core.block_manager import BlockManager
from jpaged.sampling_params import SamplingParams
from jpaged.core.sequence import Request, Sequence


def _seq(n_tokens=1, tokens=None):
    tokens = list(tokens) if tokens is not None else [1] * n_tokens
    req = Request("r", None, list(tokens), SamplingParams(), 0.0)
    return Sequence(req, tokens, len(tokens))


def check_invariants(bm: BlockManager, live: list[Sequence], swapped: list[Sequence] = ()):
    holders = {}
    for seq in live:
        for block in seq.block_table:
            holders[block] = holders.get(block, 0) + 1
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    # every used block is held by exactly as many live sequences as its reference count
    assert holders == {b: c for b, c in enumerate(bm.ref_counts) if c}
    assert bm.num_logical_blocks == sum(holders.values())
    free, evictable = bm.free_blocks(), bm.prefix_cache.evictable_blocks()
    assert len(set(free) | set(evictable)) == len(free) + len(evictable) == bm.num_free_blocks
    assert not (set(free) | set(evictable)) & set(holders)  # a held block is never free/evictable
    # the prefix cache: hash -> block and block -> hash agree; unheld cached blocks are evictable
    cache = bm.prefix_cache
    assert {b: h for h, b in cache._block_of.items()} == cache._key_of
    assert set(evictable) == {b for b in cache._key_of if not bm.ref_counts[b]}
    assert not set(free) & set(cache._key_of)
    # a block a sequence took from (or gave to) the cache still holds that prefix: never evicted
    for seq in live:
        for i in range(seq.num_cached_blocks):
            assert cache.key_of(seq.block_table[i]) == cache.block_key(seq, i)
    host = {}
    for seq in swapped:
        assert not seq.block_table
        for block in seq.host_block_table:
            host[block] = host.get(block, 0) + 1
    assert host == {b: c for b, c in enumerate(bm.swap_space.ref_counts) if c}
    assert bm.swap_space.num_used_blocks == len(host)


class PoolModel:
    """What each physical slot holds (the token whose K/V was written there)."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[tuple[int, int], int] = {}
        self.host: dict[tuple[int, int], int] = {}

    def copy(self, copies, src_store, dst_store):
        bs = self.bm.block_size
        moved = {(d, o): src_store.get((s, o)) for s, d in copies for o in range(bs)}
        for key, value in moved.items():
            dst_store[key] = value

    def compute(self, seq: Sequence, num_tokens: int):
        """What a step does: copy-on-write copies, then write the new tokens' K/V."""
        copies = self.bm.append(seq, num_tokens)
        for src, dst in copies:
            assert self.bm.ref_counts[dst] == 1 and src != dst
        if copies:
            event("copy-on-write")
        self.copy(copies, self.slots, self.slots)
        bs = self.bm.block_size
        for pos in range(seq.num_computed_tokens, num_tokens):
            self.slots[(seq.block_table[pos // bs], pos % bs)] = seq.token_ids[pos]
        seq.num_computed_tokens = num_tokens

    def check(self, seq: Sequence):
        bs = self.bm.block_size
        got = [self.slots.get((seq.block_table[p // bs], p % bs)) for p in range(seq.num_computed_tokens)]
        assert got == seq.token_ids[:seq.num_computed_tokens]


BASES = [[(7 * i) % 5 for i in range(200)], [(7 * i) % 5 for i in range(40)] + [3] * 160]

ops = st.lists(st.tuples(st.sampled_from(["new", "new", "extend", "extend", "fork", "fork", "free",
                                          "swap_out", "swap_in", "swap_in"]),
                         st.integers(0, 1000), st.integers(1, 40)), min_size=10, max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 24), st.sampled_from([1, 4, 8]), st.booleans(), st.integers(0, 12))
def test_random_ops_keep_invariants(ops, num_blocks, block_size, caching, host_blocks):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching, num_host_blocks=host_blocks)
    pool = PoolModel(bm)
    live: list[Sequence] = []
    swapped: list[Sequence] = []
    for op, pick, n in ops:
        if op == "new" or not live and op != "swap_in":
            seq = _seq(tokens=BASES[pick % 2][:n] + [pick % 3])  # shared prefixes: cache hits
            hits = bm.match_prefix(seq)
            assert len(hits) * block_size < seq.num_tokens  # the last token is always computed
            if bm.blocks_for(seq.num_tokens) - len(hits) <= bm.num_free_blocks - bm.num_evictable(hits):
                bm.take_prefix(seq, hits)
                if hits:
                    event("prefix cache hit")
                pool.check(seq)  # cached blocks hold exactly this prefix
                pool.compute(seq, seq.num_tokens)
                live.append(seq)
        elif op == "swap_in":
            if swapped:
                seq = swapped[pick % len(swapped)]
                if bm.can_swap_in([seq]):
                    pool.copy(bm.swap_in([seq]), pool.host, pool.slots)
                    event("swap in")
                    swapped.remove(seq)
                    live.append(seq)
        else:
            seq = live[pick % len(live)]
            if op == "extend":  # decode or a chunk: may need copy-on-write of a shared block
                seq.token_ids += [(pick + i) % 4 for i in range(1 + n % 6)]
                target = seq.num_tokens
                if bm.can_append(seq, target):
                    pool.compute(seq, target)
                    assert len(seq.block_table) == -(-target // block_size)
                else:
                    del seq.token_ids[-(1 + n % 6):]
            elif op == "fork":
                child = _seq(tokens=seq.token_ids)
                bm.fork(seq, child)
                child.num_computed_tokens = seq.num_computed_tokens
                live.append(child)
            elif op == "swap_out":
                if bm.can_swap_out([seq]):
                    pool.copy(bm.swap_out([seq]), pool.slots, pool.host)
                    live.remove(seq)
                    swapped.append(seq)
            else:
                bm.free(seq)
                live.remove(seq)
        for s in live:
            bm.cache_blocks(s)  # what the scheduler does at the start of every step
        check_invariants(bm, live, swapped)
        for s in live:
            pool.check(s)
    if bm.prefix_cache.num_evictions:
        event("eviction")
    for seq in live + swapped:
        bm.free(seq)
    assert bm.num_free_blocks == num_blocks and not any(bm.ref_counts)  # nothing leaks
    assert bm.swap_space.num_used_blocks == 0 and not any(bm.swap_space.ref_counts)


def test_grow_beyond_free_raises_and_changes_nothing():
    bm = BlockManager(2, 4)
    seq = _seq()
    assert not bm.can_append(seq, 9)
    try:
        bm.grow(seq, 9)
    except RuntimeError as e:
        assert "out of KV blocks" in str(e)
    else:
        raise AssertionError("grow past the pool must raise")
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_copy_on_write_copies_only_the_shared_partial_block():
    bm = BlockManager(10, 4)
    parent = _seq(tokens=range(10))  # blocks: 4 + 4 + 2 tokens
    bm.append(parent, 10)
    parent.num_computed_tokens = 10
    last = parent.block_table[2]
    children = [_seq(tokens=range(10)) for _ in range(3)]
    for c in children:
        bm.fork(parent, c)
        c.num_computed_tokens = 10
    assert bm.num_used_blocks == 3 and bm.num_logical_blocks == 12
    copies = []
    for s in [parent] + children:  # each writes token 10 into the shared last block
        s.token_ids.append(99)
        assert bm.cow_blocks_needed(s, 11) == (s is not children[-1])
        copies += bm.append(s, 11)
    assert len(copies) == 3 and all(src == last for src, _ in copies)
    assert children[-1].block_table == parent.block_table[:2] + [last]  # the last holder writes in place
    assert bm.num_used_blocks == 2 + 4 and bm.ref_counts[parent.block_table[0]] == 4


def test_prefix_cache_lru_eviction_and_dedup():
    bm = BlockManager(10, 4, enable_prefix_caching=True)
    a = _seq(tokens=list(range(9)))  # 2 full blocks + 1 token
    bm.take_prefix(a, bm.match_prefix(a))
    bm.append(a, 9)
    a.num_computed_tokens = 9
    bm.free(a)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 10
    b = _seq(tokens=list(range(8)) + [50, 51])
    hits = bm.match_prefix(b)
    assert len(hits) == 2 and bm.num_evictable(hits) == 2
    bm.take_prefix(b, hits)
    assert b.num_computed_tokens == 8 and bm.prefix_cache.hit_rate == 8 / (9 + 10)
    # a fully cached prompt still computes its last token (here: the whole last block)
    c = _seq(tokens=list(range(8)))
    assert len(bm.match_prefix(c)) == 1
    # two sequences that computed the same prefix separately end up sharing one copy
    d, e = _seq(tokens=[7] * 9), _seq(tokens=[7] * 9)
    for s in (d, e):
        bm.append(s, 9)
        s.num_computed_tokens = 9
    used = bm.num_used_blocks
    bm.cache_blocks(d)
    bm.cache_blocks(e)
    assert d.block_table[:2] == e.block_table[:2] and bm.num_used_blocks == used - 2
    # under pressure the least recently used unheld cached block goes first, held ones never
    bm.free(b)
    assert bm.num_cached_blocks == 2
    lru, mru = bm.prefix_cache.evictable_blocks()
    f = _seq(tokens=[9] * (4 * (len(bm.free_blocks()) + 1)))
    bm.append(f, f.num_tokens)
    assert bm.prefix_cache.num_evictions == 1 and bm.prefix_cache.evictable_blocks() == [mru] and lru in f.block_table
    assert d.block_table[:2] == e.block_table[:2] and all(bm.ref_counts[b] == 2 for b in d.block_table[:2])
