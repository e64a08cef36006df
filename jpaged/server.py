"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) around one engine.

    import jpaged.server
    jpaged.server.serve()                        # blocks: http://127.0.0.1:8000/v1

    handle = jpaged.server.start_server(port=0)  # uvicorn in a thread, for tests and notebooks
    client = openai.OpenAI(base_url=handle.url + "/v1", api_key="unused")
    ...
    handle.shutdown()

Endpoints: POST /v1/completions and /v1/chat/completions (streaming with
server-sent events ending in `data: [DONE]`), GET /v1/models, /health,
/metrics (Prometheus), POST /tokenize and /detokenize. Binds 127.0.0.1 unless
told otherwise; `api_key` makes every /v1, /tokenize and /detokenize request need
`Authorization: Bearer KEY`. Errors are 4xx with OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import contextlib
import functools
import hmac
import json
import logging
import pathlib
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from . import responses as R
from .async_engine import AsyncEngine, EngineDeadError, EngineStepError
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .sampling_params import SamplingParams

logger = logging.getLogger("jpaged.server")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MAX_N = 16
DEFAULT_MAX_REQUEST_BYTES = 4 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: API key on protected paths and a request body size limit."""

    PROTECTED = ("/v1/", "/tokenize", "/detokenize")

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith(self.PROTECTED):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await APIError(401, "invalid or missing API key: send 'Authorization: "
                                      "Bearer KEY'", code="invalid_api_key").response()(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message
        return await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> JSONResponse:
    return APIError(413, f"request body is larger than the limit of {limit} bytes",
                    code="request_too_large").response()


_ERRORS = {status: {"model": P.ErrorResponse, "description": desc} for status, desc in
           [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
            (413, "request body too large"), (500, "server error"), (503, "engine not running")]}


# One server-sent event as OpenAPI (before 3.2) documents a text/event-stream: each
# `data` is a JSON chunk, the last one `[DONE]`.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                             "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _stream_doc(model) -> dict:
    return {200: {"model": model, "description": "JSON, or server-sent events when stream=true",
                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}}, **_ERRORS}


def default_model_name(model) -> str:
    """The model path's stem (a folder's name); SmolLM2-135M-Instruct for the default model."""
    from .llm import LLM
    if isinstance(model, LLM):
        if model.model_path is None:  # an in-memory model
            return "model"
        model = model.model_path
    if model is None:
        return DEFAULT_MODEL_NAME
    if not isinstance(model, (str, pathlib.Path)):
        return "model"
    path = pathlib.Path(model)
    with contextlib.suppress(Exception):
        from jpaged.models.loader import resolve_model_path
        if path.resolve() == resolve_model_path(None):
            return DEFAULT_MODEL_NAME
    return path.name if path.is_dir() else path.stem


class _App:
    """The routes' shared state: engine, a tokenizer of its own, limits and metrics."""

    def __init__(self, engine: AsyncEngine, names: list[str], max_n: int):
        llm = engine.llm
        self.engine, self.names, self.max_n = engine, names, max_n
        # The engine thread detokenizes with llm.tokenizer; this thread uses a copy.
        import copy
        self.tokenizer = copy.deepcopy(llm.tokenizer)
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.model_config.vocab_size
        self.max_logprobs = llm.config.max_logprobs
        self.metrics = ServerMetrics(engine, names[0])
        self.decode = functools.lru_cache(maxsize=1 << 16)(
            lambda t: self.tokenizer.decode([t], skip_special_tokens=False))

    # ---- validation --------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"{self.names[0]!r}", param="model", code="model_not_found")
        if not self.engine.alive:
            raise APIError(503, "the engine has stopped", type="server_error", code="engine_dead")

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param} is empty: it must have at least one token", param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"{param} has token ids outside the vocabulary "
                                f"[0, {self.vocab_size}): {bad[:5]}", param)
        return ids

    def params(self, req, num_prompt: int, max_tokens: int | None,
               logprobs: int | None) -> SamplingParams:
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if req.n > self.max_n or (req.best_of or 0) > self.max_n:
            raise APIError(400, f"n and best_of must be <= {self.max_n} on this server", "n")
        if req.stream and (req.best_of or req.n) > req.n:
            raise APIError(400, "best_of > n is not supported with stream=true", "best_of")
        if logprobs is not None and logprobs > self.max_logprobs:
            raise APIError(400, f"at most {self.max_logprobs} log-probabilities per token can be "
                                f"returned, got {logprobs}", "logprobs")
        room = self.max_model_len - num_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} "
                                f"tokens; the prompt has {num_prompt}, which leaves no room for "
                                "output", "prompt", "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} "
                                f"tokens. However, you requested {num_prompt + max_tokens} tokens "
                                f"({num_prompt} in the prompt, {max_tokens} in the completion)",
                           "max_tokens", "context_length_exceeded")
        kw = R.sampling_kwargs(req, max_tokens or room, logprobs, self.vocab_size)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            field = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
            raise APIError(400, str(e), field if field in kw else None) from None

    def prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((p, self.check_ids(self.tokenizer(p).input_ids, "prompt")))
            else:
                out.append((None, self.check_ids(list(p), "prompt")))
        return out

    def chat_ids(self, messages, add_generation_prompt: bool) -> list[int]:
        try:
            convo = [{"role": m.role, "content": R.message_text(m)} for m in messages]
            ids = self.tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=False)
        except Exception as e:  # noqa: BLE001 - a template rejecting the chat is bad input
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None
        return self.check_ids(list(ids), "messages")

    # ---- generation --------------------------------------------------------------------------

    def run(self, raw: Request, jobs, prefix: str):
        """The jobs' outputs as (job index, RequestOutput); ends if the client goes away."""
        async def disconnected():
            while (await raw.receive())["type"] != "http.disconnect":
                pass
        return self.engine.generate_many(
            [({"prompt_token_ids": ids, "prompt": text}, params, f"{prefix}-{i}")
             for i, (text, ids, params) in enumerate(jobs)],
            disconnected, on_finish=self.metrics.observe_output, on_abort=self.metrics.aborted.inc)

    async def respond(self, raw: Request, req, jobs, fmt) -> Response:
        prefix = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
        fmt.id = prefix
        if req.stream:
            return StreamingResponse(self._sse(raw, jobs, fmt, prefix), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finals = {}
        try:
            async with contextlib.aclosing(self.run(raw, jobs, prefix)) as outs:
                async for i, out in outs:
                    if out.finished:
                        finals[i] = out
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None
        except EngineStepError as e:
            raise APIError(500, str(e), type="server_error") from None
        except EngineDeadError as e:
            raise APIError(503, str(e), type="server_error", code="engine_dead") from None
        if len(finals) < len(jobs):  # the client went away
            return Response(status_code=499)
        return JSONResponse(fmt.response([finals[i] for i in range(len(jobs))]).model_dump(mode="json"))

    async def _sse(self, raw, jobs, fmt, prefix):
        try:
            for chunk in fmt.start():
                yield f"data: {json.dumps(chunk)}\n\n"
            async with contextlib.aclosing(self.run(raw, jobs, prefix)) as outs:
                async for i, out in outs:
                    for chunk in fmt.chunks(i, out):
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            usage = fmt.usage_chunk()
            if usage is not None:
                yield f"data: {json.dumps(usage)}\n\n"
        except Exception as e:  # noqa: BLE001 - the status is sent: report in the stream
            bad = isinstance(e, (ValueError, TypeError))
            error = {"message": str(e), "type": "invalid_request_error" if bad else "server_error",
                     "param": None, "code": 400 if bad else 500}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"


def create_app(engine: AsyncEngine, served_model_name: str | list[str] | None = None, *,
               api_key: str | None = None, max_n: int = DEFAULT_MAX_N,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app over a running AsyncEngine; `app.state.jpaged` holds its state."""
    names = [served_model_name] if isinstance(served_model_name, str) else \
        list(served_model_name or [DEFAULT_MODEL_NAME])
    state = _App(engine, names, max_n)
    app = FastAPI(title="jpaged", version="0.1.0",
                  description="OpenAI-compatible API of the jpaged engine")
    app.state.jpaged = state

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        state.metrics.error(exc.status)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg, param = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        else:  # name the field; a union field's branches are listed once each
            msg = "; ".join(dict.fromkeys(
                f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
                f"{e.get('msg')}" for e in errors[:6])) or "invalid request"
            param = loc[0] if loc else None
        return await _api_error(request, APIError(400, msg, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return await _api_error(request, APIError(exc.status_code, str(exc.detail),
                                                  code=None, type="invalid_request_error"))

    @app.exception_handler(_BodyTooLarge)
    async def _large(request, exc):
        state.metrics.error(413)
        return _too_large(max_request_bytes)

    @app.exception_handler(Exception)
    async def _crash(request, exc):
        logger.exception("unhandled error")
        return await _api_error(request, APIError(500, f"internal error: {exc!r}", type="server_error"))

    @app.get("/health", responses={503: _ERRORS[503]})
    async def health() -> dict[str, str]:
        if not engine.alive:
            raise APIError(503, "the engine has stopped", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=n, root=n, max_model_len=state.max_model_len)
                                 for n in names])

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses=_stream_doc(P.CompletionResponse))
    async def completions(req: P.CompletionRequest, raw: Request):
        state.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (no prompt logprobs)", "echo")
        prompts = state.prompts(req.prompt)
        jobs = [(text, ids, state.params(req, len(ids), req.max_tokens, req.logprobs))
                for text, ids in prompts]
        fmt = R.CompletionFormatter(req, names[0], prompts, state.decode, state.tokenizer)
        return await state.respond(raw, req, jobs, fmt)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses=_stream_doc(P.ChatCompletionResponse))
    async def chat_completions(req: P.ChatCompletionRequest, raw: Request):
        state.check_model(req.model)
        if req.tools:
            raise APIError(400, "tools are not supported", "tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        ids = state.chat_ids(req.messages, req.add_generation_prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        jobs = [(None, ids, state.params(req, len(ids), max_tokens, logprobs))]
        fmt = R.ChatFormatter(req, names[0], [(None, ids)], state.decode, state.tokenizer)
        return await state.respond(raw, req, jobs, fmt)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=_ERRORS)
    async def tokenize(req: P.TokenizeRequest):
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise APIError(400, "messages is empty", "messages")
            ids = state.chat_ids(req.messages, req.add_generation_prompt)
        else:
            ids = state.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        return P.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=list(ids))

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(req: P.DetokenizeRequest):
        state.check_model(req.model)
        if req.tokens:
            state.check_ids(req.tokens, "tokens")
        return P.DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens))

    _finish_schema(app, {"token_id": state.vocab_size - 1, "n": max_n, "logprobs": state.max_logprobs,
                         "max_tokens": state.max_model_len - 1})
    app.add_middleware(_Guard, api_key=api_key, max_bytes=max_request_bytes)
    return app


def _finish_schema(app: FastAPI, limits: dict[str, int]) -> None:
    """The OpenAPI schema as served: validation errors are 400s with OpenAI bodies (not
    FastAPI's 422), and fields marked with `x-jpaged-limit` get this server's maximum."""
    original = app.openapi

    def fill(node):
        if isinstance(node, dict):
            if "x-jpaged-limit" in node:
                node["maximum"] = limits[node.pop("x-jpaged-limit")]
            for value in node.values():
                fill(value)
        elif isinstance(node, list):
            for value in node:
                fill(value)

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            fill(schema)
            app.openapi_schema = schema
        return app.openapi_schema
    app.openapi = openapi



# ---- running it ------------------------------------------------------------------------------


class ServerHandle:
    """A server running in a background thread: `.url` ("http://127.0.0.1:PORT"), `.engine`
    (the AsyncEngine; `.engine.call_sync(fn)` runs fn(llm) on the engine thread), `.app`,
    and `.shutdown()`, which stops uvicorn and then the engine (if it owns it)."""

    def __init__(self, app, engine, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", own_engine: bool = True):
        import uvicorn
        self.app, self.engine, self.own_engine = app, engine, own_engine
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="jpaged-uvicorn", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                self.shutdown()
                raise RuntimeError(f"the server did not start on {host}:{port} (see the log)")
            time.sleep(0.01)
        self.host, self.port = host, self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"

    def shutdown(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.own_engine:
            self.engine.shutdown(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def start_server(model=None, host: str = "127.0.0.1", port: int = 0, *,
                 served_model_name: str | list[str] | None = None, api_key: str | None = None,
                 max_n: int = DEFAULT_MAX_N, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 log_level: str = "warning", warmup: bool = False, params=None, tokenizer=None,
                 **engine_args) -> ServerHandle:
    """Load the model, start the engine and uvicorn in background threads, and return once
    the server accepts connections: `with start_server(port=0) as h: ... h.url ...`.
    `model`: a path, None for the embedded default, an in-memory Flax model (with `params=`
    and `tokenizer=`) or an `LLM`, which the server then owns; `engine_args`: EngineConfig
    fields. `warmup`: compile every step shape first (greedy sampling; `LLM.warmup`), so no
    request waits for a compilation. `port=0` picks a free port. To serve another app (say
    with an API key) over the same engine:
    `ServerHandle(create_app(h.engine, api_key=KEY), h.engine, own_engine=False)`."""
    from .llm import LLM
    llm = model if isinstance(model, LLM) else LLM(model, params=params, tokenizer=tokenizer,
                                                   **engine_args)
    if warmup:
        logger.warning("compiled %d step shapes in %.0f s", len(llm.input_builder.step_buckets()),
                       llm.warmup(use_tqdm=log_level in ("info", "debug")))
    engine = AsyncEngine(llm)
    try:
        app = create_app(engine, served_model_name or default_model_name(model), api_key=api_key,
                         max_n=max_n, max_request_bytes=max_request_bytes)
        return ServerHandle(app, engine, host, port, log_level)
    except BaseException:
        engine.shutdown()
        raise


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          **kwargs) -> None:
    """Serve until Ctrl-C (the arguments of `start_server`). In a thread, or for a handle
    to stop it, use `start_server` instead."""
    handle = start_server(model, host, port, log_level=log_level, **kwargs)
    logger.warning("jpaged serving %s at %s/v1", handle.app.state.jpaged.names[0], handle.url)
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it as Ctrl-C does
        import signal
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while handle.thread.is_alive():
            handle.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        handle.shutdown()


def add_serve_arguments(parser) -> None:
    """`jpaged serve` flags: server options plus every engine flag."""
    import os
    from .cli import _add_engine_flags, parse_bytes
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 exposes the server to the network "
                             "[default: 127.0.0.1]")
    parser.add_argument("--port", type=int, default=8000, help="[default: 8000]")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) clients use; the first is reported [default: the "
                             f"model file's stem, {DEFAULT_MODEL_NAME} for the default model]")
    parser.add_argument("--api-key", default=os.environ.get("JPAGED_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 requests "
                             "[default: $JPAGED_API_KEY, or none]")
    parser.add_argument("--max-n", type=int, default=DEFAULT_MAX_N,
                        help=f"largest n / best_of a request may ask for [default: {DEFAULT_MAX_N}]")
    parser.add_argument("--max-request-bytes", type=parse_bytes, default=DEFAULT_MAX_REQUEST_BYTES,
                        metavar="BYTES", help="largest request body; takes units (4MiB) [default: 4MiB]")
    parser.add_argument("--warmup", action="store_true",
                        help="compile every step shape before serving (greedy sampling); slow "
                             "once, then served from the persistent compilation cache")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))
    _add_engine_flags(parser)


def cmd_serve(args) -> int:
    from .cli import _collect
    serve(args.model, args.host, args.port, served_model_name=args.served_model_name,
          api_key=args.api_key, max_n=args.max_n, max_request_bytes=args.max_request_bytes,
          log_level=args.log_level, warmup=args.warmup, **_collect(args, "engine."))
    return 0


if __name__ == "__main__":  # python -m jpaged.server [flags]: the same as `jpaged serve`
    import argparse
    import sys
    _parser = argparse.ArgumentParser(prog="python -m jpaged.server",
                                      description="OpenAI-compatible server of jpaged")
    add_serve_arguments(_parser)
    sys.exit(cmd_serve(_parser.parse_args()))
