"""Maps each sequence's logical KV blocks to physical blocks of the one pool.

Host-side bookkeeping only (docs/design.md, "Paging and block tables"); the pool lives on
the device and this class deals in block ids. It keeps:

- a free list and reference counts: a block shared by forked sequences (parallel
  samples, beams) is freed when its last holder lets go;
- copy-on-write: before a sequence writes into a block it shares, it gets a fresh
  block and the engine copies the old one into it (`append` returns the copies).
  Only the last, partly filled block of a sequence can ever be shared and written;
- prefix caching (`PrefixCache`): a new sequence takes the cached blocks of its longest
  cached prefix; cached blocks nobody holds count as free and are evicted, least
  recently used first, when the pool needs room. A full block whose key is already
  cached is replaced by the cached copy (deduplication);
- swapping: a group of sequences moves to host blocks (`SwapSpace`) and back, shared
  blocks staying shared.

How many blocks a sequence gets, and when, is `policy` (`kv_alloc_policy.py`): on demand
(`paged`), or the paper's baselines that reserve a sequence's whole space at admission as one
contiguous run of block ids. With `share_blocks=False` (a benchmark baseline; the reserving
policies always) a forked sequence still starts on its parent's blocks, but the first write
by either gives the writer private copies of ALL the blocks they share, not only the one
written: the memory of a system that copies a sequence's whole cache to fork it.
"""
from __future__ import annotations

import collections

from jpaged.utils import cdiv

from .kv_alloc_policy import OnDemandPolicy, final_length
from .prefix_cache import PrefixCache
from .sequence import Sequence
from .swap_space import SwapSpace


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0, policy=None, share_blocks: bool = True):
        assert num_blocks > 0 and block_size > 0 and num_host_blocks >= 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.policy = policy or OnDemandPolicy(block_size)
        self.share_blocks = share_blocks and not self.policy.reserves
        enable_prefix_caching = enable_prefix_caching and self.share_blocks
        self.ref_counts = [0] * num_blocks
        self._free = collections.deque(range(num_blocks))  # unreferenced and not cached
        self._total_refs = 0
        self.prefix_cache = PrefixCache(block_size, enable_prefix_caching)
        self.swap_space = SwapSpace(num_host_blocks)

    # ---- counts ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get: never used, or only holding an evictable cached prefix."""
        return len(self._free) + self.prefix_cache.num_evictable

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks no sequence holds that still keep a cached prefix (counted as free)."""
        return self.prefix_cache.num_evictable

    @property
    def num_logical_blocks(self) -> int:
        """Sum of all sequences' block-table lengths: the blocks needed without any sharing."""
        return self._total_refs

    def free_blocks(self) -> list[int]:
        """Blocks on the free list (not counting evictable cached ones), for checks."""
        return list(self._free)

    def memory_breakdown(self, seqs, max_model_len: int, waiting: Sequence | None = None) -> dict[str, int]:
        """Where the pool's slots are now (the paper's Fig. 2), in slots; the values sum to
        the pool. `seqs`: the sequences holding blocks (the running ones); `waiting`: the
        next sequence to admit, if any.

        - token_states: slots holding a computed token's K/V (a shared block counts once);
        - reserved: allocated slots a sequence will fill before it ends (up to prompt +
          max_tokens: the benchmarks generate every request in full);
        - internal_fragmentation: allocated slots no token will ever fill;
        - external_fragmentation: free slots the next waiting sequence cannot use because
          they lie in runs of consecutive blocks shorter than its reservation (reserving
          policies only: on demand, any free block serves);
        - free: the other free slots (cached blocks nobody holds included)."""
        bs = self.block_size
        best: dict[int, tuple[int, int]] = {}  # block -> (token slots, reserved slots)
        for seq in seqs:
            computed, final = seq.num_computed_tokens, final_length(seq, max_model_len)
            for i, block in enumerate(seq.block_table):
                tok = min(bs, max(0, computed - i * bs))
                res = min(bs, max(0, final - i * bs)) - tok
                best[block] = max(best.get(block, (0, 0)), (tok, max(0, res)))
        tokens = sum(t for t, _ in best.values())
        reserved = sum(r for _, r in best.values())
        external = 0
        if waiting is not None and self.policy.reserves and not waiting.block_table:
            need = self.num_new_blocks(waiting, waiting.num_tokens)
            external = bs * sum(n for _, n in self.free_runs() if n < need)
        return {"token_states": tokens, "reserved": reserved,
                "internal_fragmentation": self.num_used_blocks * bs - tokens - reserved,
                "external_fragmentation": external,
                "free": self.num_free_blocks * bs - external}

    # ---- raw block operations ---------------------------------------------------------------

    def _alloc(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self.prefix_cache.num_evictable:
            block = self.prefix_cache.evict()
        else:
            raise RuntimeError("out of KV blocks")
        assert self.ref_counts[block] == 0, f"free block {block} still referenced"
        self.ref_counts[block] = 1
        self._total_refs += 1
        return block

    def free_runs(self) -> list[tuple[int, int]]:
        """(first block, length) of each run of consecutive block ids on the free list."""
        free = sorted(self._free)
        runs, start = [], None
        for i, block in enumerate(free):
            if start is None or block != free[i - 1] + 1:
                if start is not None:
                    runs.append((start, free[i - 1] - start + 1))
                start = block
        if start is not None:
            runs.append((start, free[-1] - start + 1))
        return runs

    def largest_free_run(self) -> int:
        return max((n for _, n in self.free_runs()), default=0)

    def _alloc_run(self, n: int) -> list[int]:
        """`n` consecutive block ids from the free list, the first run that fits (first fit)."""
        start = next((b for b, length in self.free_runs() if length >= n), None)
        if start is None:
            raise RuntimeError(f"out of KV blocks: no {n} contiguous free blocks "
                               f"(largest run {self.largest_free_run()})")
        run = range(start, start + n)
        taken = set(run)
        self._free = collections.deque(b for b in self._free if b not in taken)
        for block in run:
            self.ref_counts[block] = 1
        self._total_refs += n
        return list(run)

    def _incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:  # a cached block nobody held: no longer evictable
            self.prefix_cache.reclaim(block)
        self.ref_counts[block] += 1
        self._total_refs += 1

    def _decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        self._total_refs -= 1
        if self.ref_counts[block] == 0:
            if self.prefix_cache.key_of(block) is not None:
                self.prefix_cache.release(block)  # most recently used end
            else:
                self._free.append(block)

    # ---- allocation policy and growth -----------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so that its table covers `num_tokens` tokens."""
        return max(0, self.policy.target_blocks(seq, num_tokens) - len(seq.block_table))

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the blocks `seq` (none yet) takes for `num_tokens` tokens are free: under a
        reserving policy, its whole reservation as one run of consecutive free blocks."""
        need = self.num_new_blocks(seq, num_tokens)
        if self.policy.reserves and not seq.block_table:
            return need <= self.largest_free_run()
        return need <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Add blocks (as the policy says) until `num_tokens` tokens fit."""
        need = self.num_new_blocks(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free_blocks} free")
        if self.policy.reserves and not seq.block_table and need:
            seq.block_table.extend(self._alloc_run(need))
            return
        for _ in range(need):
            seq.block_table.append(self._alloc())

    # ---- copy-on-write --------------------------------------------------------------------

    def _written_blocks(self, seq: Sequence, num_tokens: int) -> range:
        """Indices of `seq`'s existing blocks that a step writing tokens
        [num_computed_tokens, num_tokens) touches."""
        first = seq.num_computed_tokens // self.block_size
        return range(first, min(len(seq.block_table), self.blocks_for(num_tokens)))

    def _copied_blocks(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Indices of `seq`'s blocks that get a private copy before the step: the shared
        blocks it writes; without sharing, every block it shares as soon as it writes."""
        table, refs = seq.block_table, self.ref_counts
        if not self.share_blocks and num_tokens > seq.num_computed_tokens:
            return [i for i in range(len(table)) if refs[table[i]] > 1]
        return [i for i in self._written_blocks(seq, num_tokens) if refs[table[i]] > 1]

    def cow_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return len(self._copied_blocks(seq, num_tokens))

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Free blocks `append(seq, num_tokens)` takes: growth plus copy-on-write copies."""
        return self.num_new_blocks(seq, num_tokens) + self.cow_blocks_needed(seq, num_tokens)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Make `seq`'s table ready for a step that writes its tokens up to `num_tokens`:
        grow it, and give it a private copy of every shared block the step writes into.
        Returns the (src, dst) block copies the engine must do before the step."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free_blocks} free")
        copies = []
        for i in self._written_blocks(seq, num_tokens):
            assert self.prefix_cache.key_of(seq.block_table[i]) is None, \
                "a step must never write into a cached full block"
        for i in self._copied_blocks(seq, num_tokens):
            src = seq.block_table[i]
            dst = self._alloc()
            self._decref(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        self.grow(seq, num_tokens)
        return copies

    def undo_copies(self, seq: Sequence, copies: list[tuple[int, int]]) -> None:
        """Give back the private copies `append` made (before they were done): the sequence
        shares the source blocks again. Used when a just-scheduled sequence is preempted."""
        for src, dst in copies:
            i = seq.block_table.index(dst)
            self._incref(src)
            seq.block_table[i] = src
            self._decref(dst)

    def trim(self, seq: Sequence) -> None:
        """Release blocks past the ones holding computed tokens (grown for a step that did not run)."""
        keep = self.blocks_for(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            self._decref(seq.block_table.pop())

    # ---- sharing --------------------------------------------------------------------------

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (copy-on-write later)."""
        assert not child.block_table
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            assert self.ref_counts[block] > 0
            self._incref(block)
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_blocks = parent.num_cached_blocks

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; blocks nobody holds return to the free list
        (or, holding a cached prefix, to the evictable list). Also releases host blocks."""
        self.cache_blocks(seq)
        for block in reversed(seq.block_table):  # the tail of a prefix is evicted first
            self._decref(block)
        for block in seq.host_block_table:
            self.swap_space.decref(block)
        seq.block_table = []
        seq.host_block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    # ---- prefix caching -------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of `seq`'s longest cached prefix (not taken yet); none for a request
        with prompt logprobs, which needs every prompt position computed (as vLLM v1)."""
        if not self.prefix_cache.enabled or seq.block_table \
                or seq.request.params.prompt_logprobs is not None:
            return []
        return self.prefix_cache.match(seq)

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` (cache hits) are counted as free now."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq` (no blocks yet) from the cached blocks `match_prefix` found."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.prefix_cache.enabled:
            return
        for block in blocks:
            self._incref(block)
        seq.block_table = list(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_cached_blocks = len(blocks)
        self.prefix_cache.record_lookup(seq.num_tokens, seq.num_computed_tokens)

    def cache_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s full, computed blocks in the prefix cache. A block whose key is
        cached already is swapped for the cached block (its own copy is released)."""
        cache = self.prefix_cache
        if not cache.enabled:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_cached_blocks, full):
            key = cache.block_key(seq, i)
            block = seq.block_table[i]
            if cache.key_of(block) == key:
                continue
            cached = cache.lookup(key)
            if cached is None:
                cache.insert(key, block)
            else:  # the same prefix computed twice (e.g. admitted in one step): keep one copy
                self._incref(cached)
                seq.block_table[i] = cached
                self._decref(block)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody holds (held ones stay until released)."""
        self._free.extend(self.prefix_cache.reset())

    def invalidate_prefix_cache(self, unplaced: list[Sequence]) -> None:
        """After new weights: no block cached so far is matched again (see
        `PrefixCache.invalidate`). `unplaced`: the sequences that hold no blocks yet, whose
        keys, computed under the old weights, are dropped. Sequences that hold blocks keep
        theirs, so the blocks they fill are never matched by a new request."""
        self._free.extend(self.prefix_cache.invalidate())
        for seq in unplaced:
            assert not seq.block_table
            seq.block_hashes = []

    # ---- swapping -------------------------------------------------------------------------

    @staticmethod
    def _distinct(tables) -> int:
        return len({b for t in tables for b in t})

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return self._distinct(s.block_table for s in seqs) <= self.swap_space.num_free_blocks

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move a group of sequences to host blocks (shared blocks stay shared). Returns the
        (device block, host block) copies to do before the device blocks are reused."""
        mapping: dict[int, int] = {}
        for seq in seqs:
            self.cache_blocks(seq)
            host_table = []
            for block in seq.block_table:
                if block not in mapping:
                    mapping[block] = self.swap_space.alloc()
                self.swap_space.incref(mapping[block])
                host_table.append(mapping[block])
            for block in reversed(seq.block_table):
                self._decref(block)
            seq.block_table = []
            seq.host_block_table = host_table
            seq.num_cached_blocks = 0
        return list(mapping.items())

    def can_swap_in(self, seqs: list[Sequence], reserve: int = 0) -> bool:
        return self._distinct(s.host_block_table for s in seqs) + reserve <= self.num_free_blocks

    def swap_in(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Bring a swapped-out group back into fresh device blocks. Returns the
        (host block, device block) copies to do before the next step."""
        mapping: dict[int, int] = {}
        for seq in seqs:
            table = []
            for host in seq.host_block_table:
                if host in mapping:
                    self._incref(mapping[host])
                else:
                    mapping[host] = self._alloc()
                table.append(mapping[host])
                self.swap_space.decref(host)
            seq.block_table = table
            seq.host_block_table = []
            seq.num_cached_blocks = 0  # re-registered (or deduplicated) by cache_blocks
        return list(mapping.items())
