"""Per-request decoding options, shaped like vLLM's `SamplingParams` and `BeamSearchParams`.

Invalid values raise `InvalidRequestError` (a `ValueError`) whose `param` is the field.
"""
from __future__ import annotations

import dataclasses

from .config import config_field
from .exceptions import InvalidRequestError

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


@dataclasses.dataclass
class SamplingParams:
    n: int = config_field(1, "completions per prompt")
    best_of: int | None = config_field(
        None, "sample this many and return the n with the highest log-probability [default: n]")
    temperature: float = config_field(1.0, "0 = greedy")
    top_p: float = config_field(
        1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    top_k: int = config_field(-1, "keep the k most likely tokens; -1 disables")
    min_p: float = config_field(0.0, "drop tokens less likely than min_p times the most likely one")
    repetition_penalty: float = config_field(
        1.0, "> 1 discourages tokens already in the prompt or output")
    presence_penalty: float = config_field(
        0.0, "subtracted from the logit of every token already generated")
    frequency_penalty: float = config_field(0.0, "subtracted once per earlier occurrence of a token")
    seed: int | None = config_field(
        None, "per-request seed: the same seed gives the same output, whatever the batch")
    max_tokens: int | None = config_field(16, "most tokens to generate ('none' = up to max_model_len)")
    min_tokens: int = config_field(
        0, "generate at least this many before EOS or a stop may end the output")
    stop: str | list[str] | None = config_field(
        None, "stop when this string appears (repeat the flag for several)")
    stop_token_ids: list[int] | None = config_field(
        None, "stop when one of these token ids is generated")
    ignore_eos: bool = config_field(False, "keep generating after the end-of-sequence token")
    include_stop_str_in_output: bool = config_field(False, "keep the matched stop string in the text")
    logprobs: int | None = config_field(
        None, "return the log-probabilities of the sampled and this many top tokens")
    prompt_logprobs: int | None = config_field(
        None, "return each prompt token's log-probability (given the tokens before it) and "
              "this many top tokens at its position (0: only its own); the request then reads "
              "no cached prefix blocks")
    skip_special_tokens: bool = config_field(True, "leave special tokens out of the text")
    detokenize: bool = config_field(
        True, "make the output text; off, outputs carry token ids only (text '', logprobs "
              "without decoded tokens) and `stop` strings are refused")

    def __post_init__(self):
        def bad(field, why):
            raise InvalidRequestError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}",
                                      field)
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            bad("best_of", f"must be an integer >= n ({self.n})")
        if not self.temperature >= 0:  # also rejects NaN
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            bad("top_k", "must be -1 (disabled) or a positive integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0")
        for field in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, field) <= 2:
                bad(field, "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 (or None for up to max_model_len)")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            bad("logprobs", "must be an integer >= 0")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or self.prompt_logprobs < 0):
            bad("prompt_logprobs", "must be an integer >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.stop and not self.detokenize:  # stop strings are matched in the text (as vLLM)
            raise InvalidRequestError("SamplingParams.stop needs detokenize=True: stop strings are "
                                      f"matched in the output text, got stop={self.stop!r}", "stop")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.best_of is None:
            self.best_of = self.n

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@dataclasses.dataclass
class BeamSearchParams:
    """`LLM.beam_search` options; `early_stopping` has transformers' meaning (True, False
    or "never"), see `jpaged.engine.beam_search`."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        def bad(field, why):
            raise InvalidRequestError(f"BeamSearchParams.{field} {why}, got "
                                      f"{getattr(self, field)!r}", field)
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            bad("beam_width", "must be an integer >= 1")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if self.early_stopping not in (True, False, "never"):
            bad("early_stopping", "must be True, False or 'never'")
