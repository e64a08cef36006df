"""What `LLM.generate` and `LLM.beam_search` return, shaped like vLLM's `RequestOutput` and
`BeamSearchOutput`."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # the sum of what the sampled tokens' logprobs hold
    # (the engine's logprobs_mode: logits in the *_logits modes)
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then per prompt
    # token its raw log-probability given the tokens before it (with its rank) and the top
    # `prompt_logprobs` tokens at its position (ranks 1..k). Computed once per request.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclasses.dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated, as vLLM
    logprobs: list[dict[int, Logprob]]  # one entry per generated token
    cum_logprob: float = 0.0
    text: str | None = None  # the generated text (without a final EOS)
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    score: float = 0.0  # cum_logprob / generated_len ** length_penalty
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first
