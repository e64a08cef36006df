"""The messages between the server's front end and the engine-core process (msgpack through
msgspec, over ZeroMQ): the front end -> core contract, as vLLM's `v1/engine/__init__.py`.

Front end -> core (one socket, PUSH -> PULL):
  AddRequest, Abort, Utility, Stop.
Core -> front end (PUSH -> PULL):
  Handshake (once, after the model loads), Ready (warm-up done), Outputs (after each step:
  what each advanced request gained, and the engine's stats snapshot), RequestError,
  UtilityResult, Failed (the core could not start).

Outputs carry deltas, not whole RequestOutputs: the tokens, logprobs and text each
completion gained since the last message (and, once, a request's prompt logprobs), so a
step's message costs the same whatever the requests' lengths. `request_delta` builds them
in the core from its sequences; `OutputAccumulator` in the front end turns them back into
the cumulative RequestOutputs that `LLM.step` gives. Host only: no jax.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from jpaged import exceptions
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams' fields
    client_request_id: str | None = None


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Utility(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    method: str  # one of UTILITY_METHODS
    args: list[Any]


class Stop(msgspec.Struct, tag=True, array_like=True):
    pass


class Handshake(msgspec.Struct, tag=True, array_like=True):
    tokenizer: bytes  # pickled: the front end tokenizes prompts and checks them itself
    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_num_seqs: int
    generation_config: dict[str, Any]
    model_path: str | None
    is_default_model: bool
    load_s: float


class Ready(msgspec.Struct, tag=True, array_like=True):
    warmup_s: float | None
    num_executables: int


# One position's logprobs: (token id, logprob, rank, decoded token)s
LogprobsEntry = list[tuple[int, float, int | None, str | None]]


class CompletionDelta(msgspec.Struct, array_like=True):
    index: int
    token_ids: list[int]  # new tokens
    logprobs: list[LogprobsEntry] | None  # per new token
    text_keep: int  # keep this many characters of the text sent so far (a stop string may cut it)
    text: str  # then append this
    cumulative_logprob: float | None
    finish_reason: str | None
    stop_reason: int | str | None


class RequestDelta(msgspec.Struct, array_like=True):
    request_id: str
    finished: bool
    completions: list[CompletionDelta]
    replace: bool = False  # the completions are whole (best_of > n picked its best at the end)
    # the request's prompt logprobs (the first entry, None, left out), in its first delta
    prompt_logprobs: list[LogprobsEntry] | None = None


class Outputs(msgspec.Struct, tag=True, array_like=True):
    requests: list[RequestDelta]
    snapshot: dict[str, Any] | None  # the engine's stats (AsyncEngine.snapshot's keys)


class RequestError(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    kind: str  # a jpaged.exceptions class name, or a builtin's
    message: str
    param: str | None


class UtilityResult(msgspec.Struct, tag=True, array_like=True):
    call_id: int
    result: Any
    error: str | None


class Failed(msgspec.Struct, tag=True, array_like=True):
    error: str


ToCore = AddRequest | Abort | Utility | Stop
FromCore = Handshake | Ready | Outputs | RequestError | UtilityResult | Failed

# EngineCore methods the front end may call by name (tests, scripts, tooling).
UTILITY_METHODS = frozenset({"kv_cache_stats", "num_requests", "num_unfinished_requests",
                             "num_compilations", "pause", "resume", "is_paused", "sleep",
                             "wake_up", "is_sleeping"})


def params_to_dict(params: SamplingParams) -> dict[str, Any]:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def error_message(request_id: str, error: BaseException) -> RequestError:
    return RequestError(request_id, type(error).__name__, str(error), getattr(error, "param", None))


def rebuild_error(msg: RequestError) -> BaseException:
    """The exception the core raised, as its jpaged type where it is one (a ValueError else)."""
    cls = getattr(exceptions, msg.kind, None)
    if isinstance(cls, type) and issubclass(cls, exceptions.InvalidRequestError):
        error = cls.__new__(cls)
        exceptions.InvalidRequestError.__init__(error, msg.message, msg.param)
        return error
    if isinstance(cls, type) and issubclass(cls, exceptions.JpagedError):
        return cls(msg.message)
    return ValueError(msg.message) if msg.kind in ("ValueError", "TypeError") else \
        exceptions.EngineStepError(msg.message)


def request_delta(request) -> RequestDelta:
    """In the core: what `request`'s sequences gained since their last message (the counters
    live on the sequences, so a finished request leaves nothing behind)."""
    params = request.params
    prompt_logprobs = None
    if request.prompt_logprobs is not None and not request.sent_prompt_logprobs:
        prompt_logprobs = [_entry(e) for e in request.prompt_logprobs[1:]]
        request.sent_prompt_logprobs = True
    if request.finished and params.best_of > params.n:  # the n best, renumbered
        seqs = sorted(request.seqs, key=lambda s: -s.cumulative_logprob)[:params.n]
        return RequestDelta(request.request_id, True,
                            [_delta(s, i, whole=True) for i, s in enumerate(seqs)], replace=True,
                            prompt_logprobs=prompt_logprobs)
    return RequestDelta(request.request_id, request.finished,
                        [_delta(s, s.index) for s in request.seqs], prompt_logprobs=prompt_logprobs)


def _entry(entry: dict[int, Logprob]) -> LogprobsEntry:
    return [(tid, lp.logprob, lp.rank, lp.decoded_token) for tid, lp in entry.items()]


def _logprobs(entry: LogprobsEntry) -> dict[int, Logprob]:
    return {t: Logprob(lp, rank, text) for t, lp, rank, text in entry}


def _delta(seq, index: int, whole: bool = False) -> CompletionDelta:
    sent_tokens, sent_text = (0, 0) if whole else (seq.sent_tokens, seq.sent_text)
    tokens = seq.token_ids[seq.num_prompt_tokens + sent_tokens:]
    logprobs = None
    if seq.logprobs is not None:
        logprobs = [_entry(entry) for entry in seq.logprobs[sent_tokens:]]
    keep = min(sent_text, len(seq.text))
    seq.sent_tokens, seq.sent_text = seq.num_output_tokens, len(seq.text)
    return CompletionDelta(index, tokens, logprobs, keep, seq.text[keep:],
                           seq.cumulative_logprob, seq.finish_reason, seq.stop_reason)


class OutputAccumulator:
    """In the front end: one request's deltas -> its cumulative RequestOutput."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int]):
        self.output = RequestOutput(request_id, prompt, prompt_token_ids, [], False)
        self._by_index: dict[int, CompletionOutput] = {}

    def add(self, delta: RequestDelta) -> RequestOutput:
        if delta.replace:
            self._by_index = {}
        prompt_logprobs = self.output.prompt_logprobs
        if delta.prompt_logprobs is not None:
            prompt_logprobs = [None] + [_logprobs(e) for e in delta.prompt_logprobs]
        for d in delta.completions:
            comp = self._by_index.get(d.index)
            if comp is None:
                comp = self._by_index[d.index] = CompletionOutput(
                    d.index, "", [], None, [] if d.logprobs is not None else None)
            comp.token_ids.extend(d.token_ids)
            if d.logprobs is not None:
                comp.logprobs.extend(_logprobs(entry) for entry in d.logprobs)
            comp.text = comp.text[:d.text_keep] + d.text
            comp.cumulative_logprob = d.cumulative_logprob
            comp.finish_reason, comp.stop_reason = d.finish_reason, d.stop_reason
        # A fresh RequestOutput each time, as LLM.step gives (consumers may keep it); the
        # lists are shared with later ones, which only append.
        self.output = RequestOutput(self.output.request_id, self.output.prompt,
                                    self.output.prompt_token_ids,
                                    [dataclasses.replace(c) for c in sorted(
                                        self._by_index.values(), key=lambda c: c.index)],
                                    delta.finished, prompt_logprobs)
        return self.output
