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

    @property
    def kv_utilization_mean(self) -> float:
        return self.kv_utilization_sum / self.steps if self.steps else 0.0

    def record_step(self, kv_utilization: float) -> None:
        self.steps += 1
        self.kv_utilization_sum += kv_utilization
        self.kv_utilization_peak = max(self.kv_utilization_peak, kv_utilization)

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, field.default)
