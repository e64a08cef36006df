"""Counters of an engine since it started (or since `reset`): what the benchmarks and the
server's metrics read."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineStats:
    steps: int = 0  # steps that ran the model
    prefill_tokens: int = 0  # prompt-chunk tokens computed (recomputed ones included)
    output_tokens: int = 0  # tokens generated (beams included)
    blocks_copied: int = 0  # copy-on-write block copies
    blocks_swapped: int = 0  # blocks moved to or from host memory
    kv_utilization_sum: float = 0.0  # per step: tokens stored / slots in the blocks in use
    kv_utilization_peak: float = 0.0
    decode_steps: int = 0  # steps with decode rows (a mixed step counts)
    decode_seqs: int = 0  # decode rows summed over those steps
    # Where the pool's slots were, summed over steps (BlockManager.memory_breakdown), kept
    # only while `record_memory` is set (the benchmarks set it: a pass over every block table)
    record_memory: bool = False
    memory_steps: int = 0
    memory_slots: dict = dataclasses.field(default_factory=dict)

    @property
    def kv_utilization_mean(self) -> float:
        return self.kv_utilization_sum / self.steps if self.steps else 0.0

    @property
    def mean_batch_size(self) -> float:
        """Mean number of sequences in a step with decode rows."""
        return self.decode_seqs / self.decode_steps if self.decode_steps else 0.0

    def record_step(self, kv_utilization: float, num_decode: int = 0) -> None:
        self.steps += 1
        self.kv_utilization_sum += kv_utilization
        self.kv_utilization_peak = max(self.kv_utilization_peak, kv_utilization)
        if num_decode:
            self.decode_steps += 1
            self.decode_seqs += num_decode

    def record_memory_breakdown(self, slots: dict[str, int]) -> None:
        self.memory_steps += 1
        for name, n in slots.items():
            self.memory_slots[name] = self.memory_slots.get(name, 0) + n

    def memory_shares(self) -> dict[str, float]:
        """Mean share of the pool in each `memory_breakdown` category over the recorded steps."""
        total = sum(self.memory_slots.values())
        return {name: n / total for name, n in self.memory_slots.items()} if total else {}

    def reset(self) -> None:
        record_memory = self.record_memory
        for field in dataclasses.fields(self):
            value = field.default_factory() if callable(field.default_factory) else field.default
            setattr(self, field.name, value)
        self.record_memory = record_memory
