"""Between the server's schemas and the engine: sampling parameters from a request (with
the engine's defaults for the fields it leaves out), and RequestOutputs formatted as
OpenAI responses or stream chunks (with logprobs; with echo, the prompt's too)."""
from __future__ import annotations

import time
from typing import Any

from jpaged.exceptions import InvalidRequestError

from .errors import shorten
from .protocol import (ChatChoice, ChatCompletionResponse, ChatLogprobs, ChatMessage,
                       ChatResponseMessage, CompletionChoice, CompletionLogprobs,
                       CompletionResponse, PromptLogprob, TokenLogprob, TopLogprob, UsageInfo,
                       _Sampling)


FLOAT_CAP = 1e6  # temperature and repetition_penalty are clamped to [1/FLOAT_CAP, FLOAT_CAP]
# (beyond, float32 overflows; the distribution is already uniform / the penalty absolute)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf (a filtered token's processed logprob): OpenAI's value


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def prompt_logprobs_json(entries):
    """vLLM's `prompt_logprobs` of a response (None stays None; -inf becomes LOGPROB_FLOOR)."""
    if entries is None:
        return None
    return [None if e is None else {t: PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank,
                                                     decoded_token=lp.decoded_token)
                                    for t, lp in e.items()} for e in entries]


def sampling_kwargs(req: _Sampling, max_tokens: int | None, logprobs: int | None,
                    vocab_size: int, defaults: dict[str, Any],
                    prompt_logprobs: int | None = None) -> dict[str, Any]:
    """The `SamplingParams` keyword arguments of a request. Sampling fields the request
    leaves out (None) take `defaults` (the engine's: the model's generation config), then
    SamplingParams' own."""
    def pick(name, fallback):
        value = getattr(req, name)
        return defaults.get(name, fallback) if value is None else value
    top_k = pick("top_k", -1)
    rep = pick("repetition_penalty", 1.0)
    return dict(n=req.n, best_of=req.best_of, temperature=min(pick("temperature", 1.0), FLOAT_CAP),
                top_p=pick("top_p", 1.0), top_k=-1 if top_k in (0, -1) else min(top_k, vocab_size),
                min_p=pick("min_p", 0.0), repetition_penalty=min(max(rep, 1 / FLOAT_CAP), FLOAT_CAP),
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, seed=req.seed,
                max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens)


def completion_logprobs(token_ids, entries, decode, top: int, offset: int = 0,
                        out: CompletionLogprobs | None = None) -> CompletionLogprobs:
    """Legacy completions format: the tokens, their log-probabilities, the `top` most likely
    tokens at each position (with the token itself) and each token's offset; appended to
    `out` if given. An entry of None (the first prompt token's) gives null."""
    out = out if out is not None else CompletionLogprobs()
    for tid, entry in zip(token_ids, entries or []):
        token = decode(tid)
        out.tokens.append(token)
        lp = entry.get(tid) if entry is not None else None
        out.token_logprobs.append(_finite(lp.logprob) if lp is not None else None)
        out.top_logprobs.append(None if entry is None else {
            decode(t): _finite(v.logprob) for t, v in entry.items()
            if t == tid or (v.rank is not None and v.rank <= top)})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(token_ids, entries, decode, top: int) -> ChatLogprobs:
    """Chat format: per token its text, log-probability, UTF-8 bytes and the `top` most
    likely tokens at that position, by rank."""
    content = []
    for tid, entry in zip(token_ids, entries or []):
        token = decode(tid)
        lp = entry.get(tid)
        ranked = sorted(((v.rank, t, v.logprob) for t, v in entry.items()
                         if v.rank is not None and v.rank <= top))
        tops = [TopLogprob(token=decode(t), logprob=_finite(v), bytes=list(decode(t).encode()))
                for _, t, v in ranked]
        content.append(TokenLogprob(token=token, logprob=_finite(lp.logprob) if lp is not None
                                    else LOGPROB_FLOOR, bytes=list(token.encode()), top_logprobs=tops))
    return ChatLogprobs(content=content)


def message_text(message: ChatMessage) -> str:
    """A message's content as one string (text parts joined); other parts are refused."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text":
            raise InvalidRequestError(f"content part of type {shorten(part.type, 50)!r} is not supported: "
                                      "only 'text'", "messages")
        if part.text is None:
            raise InvalidRequestError("a content part of type 'text' needs a 'text' field", "messages")
        texts.append(part.text)
    return "".join(texts)


# ---- response formatting ---------------------------------------------------------------------


class _Formatter:
    """Turns RequestOutputs (cumulative text) into one response or into stream chunks.
    Job i's choice j is choice number i * n + j. While streaming, text that could still
    become part of a stop string is held back until the choice finishes."""

    id_prefix = "cmpl"

    def __init__(self, req, model: str, prompts, decode, tokenizer):
        self.req, self.model, self.prompts, self.decode, self.tok = req, model, prompts, decode, tokenizer
        self.id = ""
        self.created = int(time.time())
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent: dict[tuple[int, int], list] = {}  # (job, index) -> [chars, tokens, done]

    def _usage(self, counts) -> UsageInfo:
        p = sum(len(ids) for _, ids in self.prompts)
        c = sum(counts)
        return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def usage_chunk(self) -> dict | None:
        if not (self.req.stream_options and self.req.stream_options.include_usage):
            return None
        usage = self._usage(s[1] for s in self.sent.values())
        return {"id": self.id, "object": self.chunk_object, "created": self.created,
                "model": self.model, "choices": [], "usage": usage.model_dump()}

    def start(self) -> list[dict]:
        return []

    def chunks(self, i: int, out) -> list[dict]:
        result = []
        for comp in out.outputs:
            state = self.sent.setdefault((i, comp.index), [0, 0, False])
            chars, ntok, done = state
            if done:
                continue
            finished = comp.finish_reason is not None
            end = len(comp.text) if finished else max(chars, len(comp.text) - self.holdback)
            text, tokens = comp.text[chars:end], comp.token_ids[ntok:]
            entries = comp.logprobs[ntok:] if comp.logprobs is not None else None
            state[:] = [end, len(comp.token_ids), finished]
            if text or finished or (entries and tokens) or (ntok == 0 and self._first_extra(i)):
                result.append(self._chunk(i * self.req.n + comp.index, i, text, tokens, entries,
                                          comp, ntok == 0, out))
        return result

    def _first_extra(self, i) -> bool:
        return False

    def _base(self, choices) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created,
                "model": self.model, "choices": choices}


class CompletionFormatter(_Formatter):
    chunk_object = "text_completion"

    def _echo(self, i) -> str:
        text, ids = self.prompts[i]
        return (text if text is not None else self.tok.decode(ids)) if self.req.echo else ""

    def _first_extra(self, i) -> bool:
        return bool(self._echo(i))

    def _logprobs(self, i, out, tokens, entries, offset, first):
        """The logprobs of `tokens` at text `offset`; with echo, in the choice's first part, the
        prompt's tokens first (from offset 0; the first one null), from its prompt logprobs."""
        if self.req.logprobs is None:
            return None
        lp = None
        if first and self.req.echo and out.prompt_logprobs is not None:
            lp = completion_logprobs(self.prompts[i][1], out.prompt_logprobs, self.decode,
                                     self.req.logprobs)
        return completion_logprobs(tokens, entries, self.decode, self.req.logprobs, offset, lp)

    def _chunk(self, index, i, text, tokens, entries, comp, first, out):
        echo = self._echo(i)
        offset = len(echo) + self.sent[(i, comp.index)][0] - len(text)
        lp = self._logprobs(i, out, tokens, entries, offset, first)
        choice = {"index": index, "text": (echo if first else "") + text,
                  "logprobs": lp.model_dump() if lp is not None else None,
                  "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}
        return self._base([choice])

    def response(self, finals) -> CompletionResponse:
        choices, counts = [], []
        for i, out in enumerate(finals):
            for comp in out.outputs:
                counts.append(len(comp.token_ids))
                echo = self._echo(i)
                choices.append(CompletionChoice(
                    index=i * self.req.n + comp.index, text=echo + comp.text,
                    logprobs=self._logprobs(i, out, comp.token_ids, comp.logprobs, len(echo), True),
                    finish_reason=comp.finish_reason, stop_reason=comp.stop_reason,
                    prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs)))
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=choices, usage=self._usage(counts))


class ChatFormatter(_Formatter):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, tokens, entries):
        if not self.req.logprobs:
            return None
        return chat_logprobs(tokens, entries, self.decode, self.req.top_logprobs or 0)

    def start(self) -> list[dict]:
        return [self._base([{"index": j, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}]) for j in range(self.req.n)]

    def _chunk(self, index, i, text, tokens, entries, comp, first, out):
        lp = self._logprobs(tokens, entries)
        choice = {"index": index, "delta": {"content": text} if text else {},
                  "logprobs": lp.model_dump() if lp is not None else None,
                  "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason}
        return self._base([choice])

    def response(self, finals) -> ChatCompletionResponse:
        out = finals[0]
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self._logprobs(c.token_ids, c.logprobs),
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in out.outputs]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=choices,
                                      usage=self._usage(len(c.token_ids) for c in out.outputs),
                                      prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs))
