"""What the routes share: checking a request, turning it into engine jobs, and answering
with one JSON body or a stream of server-sent events.

Prompts are tokenized and checked here, with the server's own copies of the tokenizer and
the engine's `InputProcessor` rules, so a bad request is refused before it reaches the
engine. Tokenization runs in a small thread pool (`offload`), never on the event loop: a
4 MB prompt takes seconds to tokenize, and `/health` and every stream would wait for it.
Each worker has its own copy of the tokenizer (a fast tokenizer used from two threads at
once raises "Already borrowed"). Errors are jpaged's exception types (`errors.py` maps them).

Bounds (ServerConfig): prompts, sequences and tokens per request, the stop list, and the
prompts waiting for their first token across requests (`Waiting`): one more is a 503.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import json
import queue
import threading
import uuid
import weakref

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from jpaged.engine.engine_client import EngineClient
from jpaged.engine.input_processor import InputProcessor, ProcessedPrompt
from jpaged.exceptions import (EngineDeadError, InvalidRequestError, ModelNotFoundError,
                               ServerOverloadedError)
from jpaged.sampling_params import SamplingParams

from . import formatters as F
from .config import ServerConfig
from .errors import classify, shorten
from .metrics import ServerMetrics


TOKENIZER_WORKERS = 2  # threads that tokenize (the GIL is released inside a fast tokenizer)

# (field, when a request is refused for it, why), for the request types that have the field
UNSUPPORTED = [
    ("logit_bias", lambda r: r.logit_bias, "logit_bias is not supported"),
    ("suffix", lambda r: r.suffix, "suffix is not supported"),
    ("prompt_logprobs", lambda r: r.stream and r.prompt_logprobs is not None,
     "prompt_logprobs is not available with stream=true"),
    ("tools", lambda r: r.tools, "tools are not supported"),
    ("response_format", lambda r: r.response_format and r.response_format.get("type", "text") != "text",
     "only response_format {'type': 'text'} is supported"),
    ("top_logprobs", lambda r: r.top_logprobs is not None and not r.logprobs,
     "top_logprobs needs logprobs=true"),
]


class Waiting:
    """One request's places in the server's queue: a prompt holds one from the moment the
    request is accepted until its first output (or the request's end). Held weakly by the
    server: a response dropped before it ever ran gives its places back with it."""

    __slots__ = ("prompts", "__weakref__")

    def __init__(self, num_prompts: int):
        self.prompts = set(range(num_prompts))

    def started(self, i: int) -> None:
        self.prompts.discard(i)

    def close(self) -> None:
        self.prompts.clear()


class OpenAIServing:
    """The routes' shared state: the engine, a tokenizer of the server's own, limits, metrics."""

    def __init__(self, engine: EngineClient, names: list[str], config: ServerConfig):
        info = engine.info
        self.engine, self.names, self.config = engine, names, config
        self.tokenizer = info.tokenizer  # the front end's own (the engine detokenizes with another)
        self.inputs = InputProcessor(self.tokenizer, info.vocab_size, info.max_model_len)
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.max_logprobs = info.max_logprobs
        self.sampling_defaults = dict(info.generation_config)
        self.metrics = ServerMetrics(engine, names[0])
        self.decode = functools.lru_cache(maxsize=1 << 16)(
            lambda t: self.tokenizer.decode([t], skip_special_tokens=False))
        # Each worker takes a copy of the tokenizer made here, before any thread uses it.
        copies: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(TOKENIZER_WORKERS):
            copies.put(InputProcessor(copy.deepcopy(self.tokenizer), self.vocab_size, self.max_model_len))
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            TOKENIZER_WORKERS, "jpaged-tokenize", initializer=lambda: setattr(self._local, "inputs", copies.get()))
        self._waiting: weakref.WeakSet[Waiting] = weakref.WeakSet()

    # ---- tokenization, off the event loop ----------------------------------------------------

    async def offload(self, fn, *args):
        """`fn(*args)` in a tokenizer worker thread; the event loop serves on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def worker_inputs(self) -> InputProcessor:
        """This worker thread's InputProcessor, over its own copy of the tokenizer."""
        return self._local.inputs

    # ---- checks ------------------------------------------------------------------------------

    def check_request(self, req) -> None:
        """The model a generation request names, the fields this server refuses, and the
        length of its stop lists."""
        self.check_model(req.model)
        for field, refused, message in UNSUPPORTED:
            if field in type(req).model_fields and refused(req):
                raise InvalidRequestError(message, field)
        limit = self.config.max_stop_sequences
        for field in ("stop", "stop_token_ids"):
            value = getattr(req, field)
            if isinstance(value, list) and len(value) > limit:
                raise InvalidRequestError(f"{field} lists {len(value)} entries; this server takes at "
                                          f"most {limit} (--max-stop-sequences)", field)

    def count_prompts(self, req) -> int:
        """How many prompts a completion request holds, and the sequences they would start,
        against the server's limits (before any is tokenized)."""
        prompt = req.prompt
        count = 1 if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int) else len(prompt)
        if count > self.config.max_prompts_per_request:
            raise InvalidRequestError(
                f"prompt lists {count} prompts; this server takes at most "
                f"{self.config.max_prompts_per_request} in one request (--max-prompts-per-request): "
                "send them in several requests", "prompt")
        self.check_sequences(req, count)
        return count

    def check_sequences(self, req, num_prompts: int) -> None:
        samples = max(req.n, req.best_of or 1)
        if num_prompts * samples > self.config.max_sequences_per_request:
            raise InvalidRequestError(
                f"{num_prompts} prompt(s) x {samples} samples = {num_prompts * samples} sequences; "
                f"this server starts at most {self.config.max_sequences_per_request} for one request "
                "(--max-sequences-per-request): lower n or send fewer prompts", "n")

    @contextlib.contextmanager
    def queue(self, num_prompts: int):
        """Places in the queue for a request's prompts, or a 503 when it is full; given back
        if the block raises (the response, once made, gives them back as it ends)."""
        waiting = sum(len(w.prompts) for w in self._waiting)
        if waiting + num_prompts > self.config.max_waiting_requests:
            raise ServerOverloadedError(
                f"the server's queue is full ({waiting} prompts wait for their first token; "
                f"limit {self.config.max_waiting_requests}): retry later")
        places = Waiting(num_prompts)
        self._waiting.add(places)
        try:
            yield places
        except BaseException:
            places.close()
            raise

    def check_tokens(self, req, jobs) -> None:
        """The tokens a request asks for in all (prompts, and max_tokens for every sample)."""
        samples = max(req.n, req.best_of or 1)
        tokens = sum(len(p.token_ids) + samples * params.max_tokens for p, params in jobs)
        if tokens > self.config.max_tokens_per_request:
            raise InvalidRequestError(
                f"this request asks for up to {tokens} tokens (each prompt's tokens plus max_tokens "
                f"for each of its {samples} sample(s)); this server allows at most "
                f"{self.config.max_tokens_per_request} (--max-tokens-per-request): lower max_tokens "
                "or n, or send fewer prompts", "max_tokens")

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise ModelNotFoundError(f"The model `{shorten(name)}` does not exist; this server serves "
                                     f"{self.names[0]!r}")
        if not self.engine.alive:
            raise EngineDeadError("the engine has stopped")

    def params(self, req, num_prompt: int, max_tokens: int | None,
               logprobs: int | None, prompt_param: str = "prompt") -> SamplingParams:
        """The request's SamplingParams, checked; `prompt_param`: the field that holds the
        prompt (`messages` in a chat), named by a too-long prompt's error. A completion with
        `echo` and `logprobs` asks for as many prompt logprobs (as vLLM), unless it sets
        `prompt_logprobs` itself."""
        if max(req.n, req.best_of or 0) > self.config.max_n:
            raise InvalidRequestError(f"n and best_of must be <= {self.config.max_n} on this server", "n")
        if req.stream and (req.best_of or req.n) > req.n:
            raise InvalidRequestError("best_of > n is not supported with stream=true", "best_of")
        prompt_logprobs = req.prompt_logprobs
        if prompt_logprobs is None and getattr(req, "echo", False):
            prompt_logprobs = logprobs
        for field, value in (("logprobs", logprobs), ("prompt_logprobs", req.prompt_logprobs)):
            if value is not None and value > self.max_logprobs:
                raise InvalidRequestError(f"at most {self.max_logprobs} log-probabilities per token "
                                          f"can be returned, got {field}={value}", field)
        self.inputs.check_prompt_length(num_prompt, prompt_param)
        self.inputs.check_max_tokens(num_prompt, max_tokens)
        kw = F.sampling_kwargs(req, max_tokens or self.max_model_len - num_prompt, logprobs,
                               self.vocab_size, self.sampling_defaults, prompt_logprobs)
        return SamplingParams(**kw)

    def prompts(self, prompt) -> list[ProcessedPrompt]:
        """A completion request's prompt(s): a string, token ids, or lists of either."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise InvalidRequestError("prompt is empty", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = self.worker_inputs().tokenizer(p).input_ids
                out.append(ProcessedPrompt(p, self.inputs.check_token_ids(ids)))
            else:
                out.append(ProcessedPrompt(None, self.inputs.check_token_ids(list(p))))
        return out

    def chat_ids(self, messages, add_generation_prompt: bool) -> list[int]:
        convo = [{"role": m.role, "content": F.message_text(m)} for m in messages]
        return self.worker_inputs().render_chat(convo, add_generation_prompt=add_generation_prompt)

    def text_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.worker_inputs().tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def ids_text(self, ids: list[int]) -> str:
        return self.worker_inputs().tokenizer.decode(ids)

    # ---- generation --------------------------------------------------------------------------

    async def run(self, raw: Request, jobs, prefix: str, places: Waiting):
        """The jobs' outputs as (job index, RequestOutput), one client request to the
        scheduler (its prompts take turns with other requests'); ends if the client goes away."""
        async def disconnected():
            while (await raw.receive())["type"] != "http.disconnect":
                pass
        try:
            async with contextlib.aclosing(self.engine.generate_many(
                    [(p, params, f"{prefix}-{i}")  # checked here already: the engine takes them as they are
                     for i, (p, params) in enumerate(jobs)],
                    disconnected, on_finish=self.metrics.observe_output,
                    on_abort=self.metrics.aborted.inc, client_request_id=prefix)) as outs:
                async for i, out in outs:
                    places.started(i)
                    yield i, out
        finally:
            places.close()

    async def respond(self, raw: Request, req, jobs, fmt, places: Waiting) -> Response:
        prefix = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
        fmt.id = prefix
        if req.stream:
            return StreamingResponse(self._sse(raw, jobs, fmt, prefix, places),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finals = {}
        async with contextlib.aclosing(self.run(raw, jobs, prefix, places)) as outs:
            async for i, out in outs:
                if out.finished:
                    finals[i] = out
        if len(finals) < len(jobs):  # the client went away
            return Response(status_code=499)
        return JSONResponse(fmt.response([finals[i] for i in range(len(jobs))]).model_dump(mode="json"))

    async def _sse(self, raw, jobs, fmt, prefix, places):
        try:
            for chunk in fmt.start():
                yield f"data: {json.dumps(chunk)}\n\n"
            async with contextlib.aclosing(self.run(raw, jobs, prefix, places)) as outs:
                async for i, out in outs:
                    for chunk in fmt.chunks(i, out):
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            usage = fmt.usage_chunk()
            if usage is not None:
                yield f"data: {json.dumps(usage)}\n\n"
        except Exception as e:  # noqa: BLE001 - the status is sent: report in the stream
            status, kind, param, _ = classify(e)
            error = {"message": str(e), "type": kind, "param": param, "code": status}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"
