"""Maps each sequence's logical KV blocks to physical blocks of the one pool.

Host-side bookkeeping only; the pool itself lives on the device and this class
deals in block ids. It keeps:

- a free list and reference counts: a block shared by forked sequences (parallel
  samples, beams) is freed when its last holder lets go;
- copy-on-write: before a sequence writes into a block it shares, it gets a fresh
  block and the engine copies the old one into it (`append` returns the copies).
  Only the last, partly filled block of a sequence can ever be shared and written;
- prefix caching: every full block is keyed by hash(parent block's hash, its token
  ids, extra keys). A new sequence takes the cached blocks of its longest cached
  prefix. Blocks nobody holds that still carry a cached prefix stay on an LRU list;
  they count as free and are evicted (least recently used first) when the pool needs
  room. A full block whose key is already cached is replaced by the cached copy
  (deduplication), so concurrent requests with one system prompt end up holding one
  copy of it;
- swap space: host block ids with their own free list and reference counts; a
  swapped-out group of sequences keeps sharing its blocks on the host.

How many blocks a sequence gets, and when, is `policy` (on demand by default, as in
vLLM); the paper's baselines that reserve space up front are other policies.
"""
from __future__ import annotations

import collections

from .sequence import Sequence


class OnDemandPolicy:
    """vLLM's allocation: a sequence gets a block when its tokens first reach it."""

    def target_blocks(self, bm: "BlockManager", seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq`'s table must hold before a step that leaves it with `num_tokens` tokens."""
        return bm.blocks_for(num_tokens)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_host_blocks: int = 0, policy=None):
        assert num_blocks > 0 and block_size > 0 and num_host_blocks >= 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.policy = policy or OnDemandPolicy()
        self.ref_counts = [0] * num_blocks
        self._free = collections.deque(range(num_blocks))  # unreferenced and not cached
        self._total_refs = 0
        # prefix caching
        self.enable_prefix_caching = enable_prefix_caching
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._cached: dict[int, int] = {}  # block hash -> block
        self._block_hash: dict[int, int] = {}  # block -> its hash, for cached blocks
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_evictions = 0
        # swap space
        self.num_host_blocks = num_host_blocks
        self.host_ref_counts = [0] * num_host_blocks
        self._host_free = collections.deque(range(num_host_blocks))

    # ---- counts ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get: never used, or only holding an evictable cached prefix."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks no sequence holds that still keep a cached prefix (counted as free)."""
        return len(self._evictable)

    @property
    def num_logical_blocks(self) -> int:
        """Sum of all sequences' block-table lengths: the blocks needed without any sharing."""
        return self._total_refs

    @property
    def num_host_used_blocks(self) -> int:
        return self.num_host_blocks - len(self._host_free)

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens looked up."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    # ---- raw block operations ---------------------------------------------------------------

    def _alloc(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hash.pop(block)]
            self.num_evictions += 1
        else:
            raise RuntimeError("out of KV blocks")
        assert self.ref_counts[block] == 0, f"free block {block} still referenced"
        self.ref_counts[block] = 1
        self._total_refs += 1
        return block

    def _incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:  # a cached block nobody held: no longer evictable
            del self._evictable[block]
        self.ref_counts[block] += 1
        self._total_refs += 1

    def _decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of block {block}"
        self.ref_counts[block] -= 1
        self._total_refs -= 1
        if self.ref_counts[block] == 0:
            if block in self._block_hash:
                self._evictable[block] = None  # most recently used end
            else:
                self._free.append(block)

    # ---- allocation policy and growth -----------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so that its table covers `num_tokens` tokens."""
        return max(0, self.policy.target_blocks(self, seq, num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """On-demand allocation: add blocks until `num_tokens` tokens fit."""
        need = self.num_new_blocks(seq, num_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._alloc())

    # ---- copy-on-write --------------------------------------------------------------------

    def _written_blocks(self, seq: Sequence, num_tokens: int) -> range:
        """Indices of `seq`'s existing blocks that a step writing tokens
        [num_computed_tokens, num_tokens) touches."""
        first = seq.num_computed_tokens // self.block_size
        return range(first, min(len(seq.block_table), self.blocks_for(num_tokens)))

    def cow_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return sum(1 for i in self._written_blocks(seq, num_tokens)
                   if self.ref_counts[seq.block_table[i]] > 1)

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
            src = seq.block_table[i]
            assert src not in self._block_hash, "a step must never write into a cached full block"
            if self.ref_counts[src] > 1:
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
            self._host_decref(block)
        seq.block_table = []
        seq.host_block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    # ---- prefix caching -------------------------------------------------------------------

    def extra_keys(self, seq: Sequence):
        """Anything besides the tokens that changes a block's K/V (adapters, media, salts)."""
        return None

    def block_hash(self, seq: Sequence, i: int) -> int:
        """Hash of `seq`'s i-th full block: hash(parent block's hash, token ids, extra keys)."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else None
            hashes.append(hash((parent, tuple(seq.token_ids[j * bs:(j + 1) * bs]), self.extra_keys(seq))))
        return hashes[i]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of `seq`'s longest cached prefix (not taken yet). At least the last
        token is always left to compute, so that the step has logits to sample from."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        blocks = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(self.block_hash(seq, i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` (cache hits) are counted as free now."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def take_prefix(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq` (no blocks yet) from the cached blocks `match_prefix` found."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        for block in blocks:
            self._incref(block)
        seq.block_table = list(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_cached_blocks = len(blocks)
        self.prefix_query_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens

    def cache_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s full, computed blocks in the prefix cache. A block whose key is
        cached already is swapped for the cached block (its own copy is released)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_cached_blocks, full):
            h = self.block_hash(seq, i)
            block = seq.block_table[i]
            if self._block_hash.get(block) == h:
                continue
            cached = self._cached.get(h)
            if cached is None:
                assert block not in self._block_hash
                self._cached[h] = block
                self._block_hash[block] = h
            else:  # the same prefix computed twice (e.g. admitted in one step): keep one copy
                self._incref(cached)
                seq.block_table[i] = cached
                self._decref(block)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody holds (held ones stay until released)."""
        for block in list(self._evictable):
            del self._cached[self._block_hash.pop(block)]
            self._free.append(block)
        self._evictable.clear()

    # ---- swap space -----------------------------------------------------------------------

    def _host_decref(self, block: int) -> None:
        assert self.host_ref_counts[block] > 0, f"double free of host block {block}"
        self.host_ref_counts[block] -= 1
        if self.host_ref_counts[block] == 0:
            self._host_free.append(block)

    @staticmethod
    def _distinct(tables) -> int:
        return len({b for t in tables for b in t})

    def can_swap_out(self, seqs: list[Sequence]) -> bool:
        return self._distinct(s.block_table for s in seqs) <= len(self._host_free)

    def swap_out(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """Move a group of sequences to host blocks (shared blocks stay shared). Returns the
        (device block, host block) copies to do before the device blocks are reused."""
        mapping: dict[int, int] = {}
        for seq in seqs:
            self.cache_blocks(seq)
            host_table = []
            for block in seq.block_table:
                if block not in mapping:
                    mapping[block] = self._host_free.popleft()
                self.host_ref_counts[mapping[block]] += 1
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
                self._host_decref(host)
            seq.block_table = table
            seq.host_block_table = []
            seq.num_cached_blocks = 0  # re-registered (or deduplicated) by cache_blocks
        return list(mapping.items())
