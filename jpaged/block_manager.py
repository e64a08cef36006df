"""Maps each sequence's logical KV blocks to physical blocks of the one pool.

Host-side bookkeeping only: a free list, reference counts (a block shared by
forked sequences is freed when its last holder lets go), and on-demand growth.
The pool itself lives on the device; this class deals in block ids.
"""
from __future__ import annotations

import collections

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free = collections.deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """On-demand allocation: add blocks until `num_tokens` tokens fit."""
        need = self.num_new_blocks(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, {len(self._free)} free")
        for _ in range(need):
            block = self._free.popleft()
            assert self.ref_counts[block] == 0, f"free block {block} still referenced"
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (copy-on-write later)."""
        assert not child.block_table
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            assert self.ref_counts[block] > 0
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; blocks nobody holds return to the free list."""
        for block in seq.block_table:
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
