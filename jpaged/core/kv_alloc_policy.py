"""How many KV blocks a sequence holds before a step: the block manager's one swappable piece.

`OnDemandPolicy` is vLLM's: a block is taken when the sequence's tokens first reach it, so
at most one block per sequence is partly empty. The paper's baselines (systems that reserve
a sequence's whole output, or `max_model_len`, up front) are other policies with the same
method; the block manager, scheduler and engine stay as they are.
"""
from __future__ import annotations

from jpaged.utils import cdiv

from .sequence import Sequence


class OnDemandPolicy:
    """vLLM's allocation: a sequence gets a block when its tokens first reach it."""

    def __init__(self, block_size: int):
        self.block_size = block_size

    def target_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq`'s table must hold before a step that leaves it with `num_tokens` tokens."""
        return cdiv(num_tokens, self.block_size)
