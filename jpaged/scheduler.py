"""Continuous batching: which sequences run this step, and how many tokens each.

A step is either a prefill step (prompt chunks of waiting or partly prefilled
sequences, within `max_num_batched_tokens`) or a decode step (one token for
every running sequence). Prefill goes first, as in vLLM, so new requests join
the batch as soon as blocks allow. When decode runs out of blocks the most
recently admitted sequence is preempted (recompute: its blocks are freed and
it goes back to the front of the queue, to be prefilled again).
"""
from __future__ import annotations

import collections
import dataclasses

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Admitting a new sequence leaves this many blocks free for running ones to
        # grow into, so that a full pool does not preempt on the very next step.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is None:
            batch = self._schedule_decode()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        seqs, counts = [], []
        partial = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in partial + list(self.waiting):
            if budget == 0:
                break
            is_new = seq.status is SequenceStatus.WAITING
            if is_new and len(self.running) >= self.config.max_num_seqs:
                break
            reserve = self.watermark_blocks if is_new else 0
            room = (bm.num_free_blocks - reserve) * bm.block_size \
                + len(seq.block_table) * bm.block_size - seq.num_computed_tokens
            chunk = min(seq.num_uncomputed_tokens, budget, room)
            if chunk <= 0:
                break
            bm.grow(seq, seq.num_computed_tokens + chunk)
            if is_new:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            seqs.append(seq)
            counts.append(chunk)
            budget -= chunk
        return ScheduledBatch(seqs, counts, is_prefill=True) if seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        bm = self.block_manager
        scheduled = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below by an older sequence
                continue
            while not bm.can_grow(seq, seq.num_computed_tokens + 1):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                if seq.num_uncomputed_tokens == 1:
                    bm.grow(seq, seq.num_computed_tokens + 1)
                    scheduled.append(seq)
        if not scheduled:
            return None
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
