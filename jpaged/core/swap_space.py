"""Host block ids for swapped-out sequences: a free list and reference counts
(docs/design.md, "Swapping").

Only ids live here; the bytes are in the runner's `HostKVPool`. A request group swapped
out together keeps sharing its blocks on the host (one host block per shared device block),
so the counts follow the same rule as on the device: a block is free when nobody holds it.
"""
from __future__ import annotations

import collections


class SwapSpace:
    def __init__(self, num_blocks: int):
        assert num_blocks >= 0
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = collections.deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def alloc(self) -> int:
        block = self._free.popleft()
        assert self.ref_counts[block] == 0, f"free host block {block} still referenced"
        return block

    def incref(self, block: int) -> None:
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"double free of host block {block}"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self._free.append(block)
