"""Prefix caching: full KV blocks keyed by the hash of everything before and in them
(docs/design.md, "Prefix caching").

A full block's key is hash(parent block's key, its token ids, extra keys), so equal keys
mean equal K/V. The cache maps keys to blocks and keeps the cached blocks nobody holds on
an LRU list: they count as free, and the block manager evicts them least recently used
first when it needs room. Which blocks are held, and by whom, is the block manager's
business; this class only knows keys, blocks and their order of disuse.
"""
from __future__ import annotations

import collections

from .sequence import Sequence


class PrefixCache:
    def __init__(self, block_size: int, enabled: bool):
        self.block_size = block_size
        self.enabled = enabled
        self._block_of: dict[int, int] = {}  # key -> block
        self._key_of: dict[int, int] = {}  # block -> key, for cached blocks
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.query_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which served from the cache
        self.num_evictions = 0
        # Bumped by `invalidate`: part of every key, so blocks cached before (computed with
        # other weights, or lost with the pool) are never matched again.
        self.generation = 0

    @property
    def num_evictable(self) -> int:
        """Cached blocks nobody holds (the block manager counts them as free)."""
        return len(self._evictable)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    def evictable_blocks(self) -> list[int]:
        return list(self._evictable)

    # ---- keys -----------------------------------------------------------------------------

    def extra_keys(self, seq: Sequence):
        """Anything besides the tokens that changes a block's K/V (adapters, media, salts)."""
        return None

    def block_key(self, seq: Sequence, i: int) -> int:
        """Key of `seq`'s i-th full block, computed once and kept in `seq.block_hashes`."""
        bs = self.block_size
        keys = seq.block_hashes
        while len(keys) <= i:
            j = len(keys)
            parent = keys[j - 1] if j else None
            keys.append(hash((parent, tuple(seq.token_ids[j * bs:(j + 1) * bs]), self.extra_keys(seq),
                              self.generation)))
        return keys[i]

    def key_of(self, block: int) -> int | None:
        return self._key_of.get(block)

    def lookup(self, key: int) -> int | None:
        return self._block_of.get(key)

    def match(self, seq: Sequence) -> list[int]:
        """Cached blocks of `seq`'s longest cached prefix. At least the last token is always
        left to compute, so that the step has logits to sample from."""
        blocks = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block = self._block_of.get(self.block_key(seq, i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.query_tokens += num_tokens
        self.hit_tokens += num_hit_tokens

    # ---- membership -----------------------------------------------------------------------

    def insert(self, key: int, block: int) -> None:
        assert key not in self._block_of and block not in self._key_of
        self._block_of[key] = block
        self._key_of[block] = key

    def release(self, block: int) -> None:
        """Nobody holds cached `block` any more: it becomes evictable (most recently used)."""
        self._evictable[block] = None

    def reclaim(self, block: int) -> None:
        """Somebody holds evictable `block` again."""
        del self._evictable[block]

    def evict(self) -> int:
        """Forget the least recently used evictable block and return it."""
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        self.num_evictions += 1
        return block

    def reset(self) -> list[int]:
        """Forget every evictable block (held ones stay cached); returns them."""
        blocks = list(self._evictable)
        for block in blocks:
            del self._block_of[self._key_of.pop(block)]
        self._evictable.clear()
        return blocks

    def invalidate(self) -> list[int]:
        """No block cached so far will be matched again (the weights changed): the
        evictable ones are forgotten and returned, held ones keep keys no new lookup makes."""
        self.generation += 1
        return self.reset()
