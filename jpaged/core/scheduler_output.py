"""What the scheduler hands the engine for one step: the contract between host and device.

The engine does the block operations first (swaps, then copy-on-write copies), then the
runner builds the step's arrays from `seqs` and `num_new_tokens` alone (token ids,
positions and block tables are read off the sequences). Like vLLM's `SchedulerOutput`,
it is plain data: no jax, no methods that change anything.
"""
from __future__ import annotations

import dataclasses

from .sequence import Sequence


@dataclasses.dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes this step (0: a fork sampling
    # from its parent's logits in the same step)
    is_prefill: bool  # packed prompt-chunk layout (a mixed step too); False: one token per row
    num_decode: int = 0  # in a mixed step, the leading rows that are decode tokens
    # Block operations the engine does before the step, in this order:
    blocks_to_swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (host, device)
    blocks_to_swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (device, host)
    blocks_to_copy: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def has_block_ops(self) -> bool:
        return bool(self.blocks_to_swap_in or self.blocks_to_swap_out or self.blocks_to_copy)
