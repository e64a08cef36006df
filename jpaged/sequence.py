"""A request and the sequences it decodes, with their token and KV state.

A `Sequence` owns the tokens (prompt + output) and knows how many of them
already have K/V in the pool (`num_computed_tokens`); its `block_table` lists
the physical blocks holding them, in logical order.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Sequence:
    request: "Request"
    token_ids: list[int]
    num_prompt_tokens: int
    index: int = 0  # position among the request's n outputs
    seq_id: int = dataclasses.field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = dataclasses.field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detok_state: object = None  # the incremental detokenizer's offsets
    seed: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V is not in the pool yet: 1 while decoding, more while
        prefilling (the prompt, or every token again after a recompute preemption)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
