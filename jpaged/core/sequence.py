"""A request and the sequences it decodes, with their token and KV state.

A `Sequence` owns the tokens (prompt + output) and knows how many of them
already have K/V in the pool (`num_computed_tokens`); its `block_table` lists
the physical blocks holding them, in logical order.

Sharing: a request with `best_of > 1` starts as ONE sequence whose
`pending_forks` are the other samples; the scheduler forks them off (sharing
every prompt block) when the prompt's last chunk is scheduled. A beam-search
request (`Request.beam`) forks and drops sequences every step. A swapped-out
sequence keeps its K/V in host blocks listed in `host_block_table`.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools

from jpaged.sampling_params import SamplingParams


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
    # Samples of the same request still to be forked from this one (parallel sampling).
    pending_forks: list["Sequence"] = dataclasses.field(default_factory=list)
    # Prefix caching: hashes of this sequence's full blocks (computed lazily, in order), and how
    # many of its blocks the block manager has already registered in (or deduplicated against)
    # the cache.
    block_hashes: list[int] = dataclasses.field(default_factory=list)
    num_cached_blocks: int = 0
    host_block_table: list[int] = dataclasses.field(default_factory=list)  # while SWAPPED
    preempted: bool = False  # waiting again after a recompute preemption (admitted first)
    # Output tokens and text characters already sent to a front end in another process.
    sent_tokens: int = 0
    sent_text: int = 0

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
    beam: object = None  # an engine.beam_search.BeamGroup for beam-search requests
    # The client request this one is part of (a server request with several prompts, each
    # an engine request): admission takes turns between client requests. None: its own.
    client_request_id: str | None = None
    # SamplingParams.prompt_logprobs: [None] (the first prompt token's), then one entry per
    # prompt token as its position is computed (the request's, whichever sequence computes
    # it: recorded once); and whether a front end in another process has them.
    prompt_logprobs: list | None = None
    sent_prompt_logprobs: bool = False

    @property
    def client(self) -> str:
        return self.client_request_id if self.client_request_id is not None else self.request_id

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
