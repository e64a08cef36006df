"""The OpenAI-compatible HTTP app (FastAPI) over a running engine (`EngineClient`): its routes,
its error handlers and its OpenAPI document.

Endpoints: POST /v1/completions and /v1/chat/completions (streaming with server-sent
events ending in `data: [DONE]`), GET /v1/models, /health (liveness), /ready (503 until
warm-up is done), /metrics (Prometheus), POST /tokenize and /detokenize. Errors are 4xx/5xx with OpenAI's body `{"error": {"message",
"type", "param", "code"}}`. `launcher.py` runs it (`jpaged.start_server`, `jpaged.serve`).
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from jpaged.engine.engine_client import PAUSE_MODES, EngineClient
from jpaged.engine.input_processor import ProcessedPrompt
from jpaged.exceptions import EngineDeadError, EngineNotReadyError, InvalidRequestError, JpagedError
from jpaged.version import __version__

from . import formatters as F
from . import protocol as P
from .config import DEFAULT_MODEL_NAME, ServerConfig
from .errors import classify, error_body, error_response, shorten
from .metrics import CONTENT_TYPE_LATEST
from .middleware import Guard
from .serving import OpenAIServing

logger = logging.getLogger("jpaged.entrypoints.openai")

_ERRORS = {status: {"model": P.ErrorResponse, "description": desc} for status, desc in
           [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
            (413, "request body too large"), (500, "server error"), (503, "engine not running")]}
# The research-pipeline endpoints: also 409 when the engine's state refuses the call
# (sleep while asleep or with requests in flight), 202 while a pause is still waiting.
_STATE_ERRORS = {**_ERRORS, 409: {"model": P.ErrorResponse, "description": "not in this engine state"}}

# One server-sent event as OpenAPI (before 3.2) documents a text/event-stream: each
# `data` is a JSON chunk, the last one `[DONE]`.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                             "id": {"type": "string"}, "retry": {"type": "integer"}}}


def _stream_doc(model) -> dict:
    return {200: {"model": model, "description": "JSON, or server-sent events when stream=true",
                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}}, **_ERRORS}


def _validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """A pydantic validation failure as one error naming the (first) field."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequestError(
            f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    msg = "; ".join(dict.fromkeys(  # a union field's branches are listed once each
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:6])) or "invalid request"
    return InvalidRequestError(msg, loc[0] if loc else None)


# The ServerConfig fields the app itself uses (the rest are uvicorn's or the launcher's).
APP_FIELDS = ("api_key", "protect_metrics_and_docs", "enable_control_endpoints", "max_n",
              "max_request_bytes", "max_prompts_per_request", "max_sequences_per_request",
              "max_tokens_per_request", "max_stop_sequences", "max_waiting_requests")


def create_app(engine: EngineClient, served_model_name: str | list[str] | None = None,
               **settings) -> FastAPI:
    """The FastAPI app over a running engine (an AsyncEngine, or an EngineCoreClient);
    `app.state.jpaged` holds its state. `settings`: ServerConfig fields of `APP_FIELDS`
    (the API key, the limits), ServerConfig's defaults otherwise."""
    unknown = set(settings) - set(APP_FIELDS)
    if unknown:
        raise TypeError(f"create_app got unknown settings {sorted(unknown)}; it takes {APP_FIELDS}")
    config = ServerConfig(**settings)
    names = [served_model_name] if isinstance(served_model_name, str) else \
        list(served_model_name or [DEFAULT_MODEL_NAME])
    state = OpenAIServing(engine, names, config)
    app = FastAPI(title="jpaged", version=__version__,
                  description="OpenAI-compatible API of the jpaged engine")
    app.state.jpaged = state
    # A trailing-slash redirect would build its Location from the client's Host header.
    app.router.redirect_slashes = False

    def reply(exc: BaseException):
        status = classify(exc)[0]
        if status == 500:
            logger.error("request failed", exc_info=exc)
        state.metrics.error(status)
        return error_response(exc)

    @app.exception_handler(JpagedError)
    async def _jpaged(request, exc: JpagedError):
        return reply(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and not content_type.split(";")[0].strip().lower().endswith("json"):
            got = f"got {shorten(content_type)!r}" if content_type else "no Content-Type was sent"
            return reply(InvalidRequestError(
                f"the body must be JSON sent with 'Content-Type: application/json' ({got})"))
        return reply(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        state.metrics.error(exc.status_code)
        return error_body(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(request, exc):
        return reply(exc)

    @app.get("/health", responses={503: _ERRORS[503]})
    async def health() -> dict[str, str]:
        """Liveness: the engine runs (warming up or serving)."""
        if not engine.alive:
            raise EngineDeadError("the engine has stopped")
        return {"status": "ok"}

    @app.get("/ready", responses={503: _ERRORS[503]})
    async def ready() -> dict[str, str]:
        """Readiness: warm-up is done, so no request waits for a compilation."""
        if not engine.alive:
            raise EngineDeadError("the engine has stopped")
        if not engine.ready.is_set():
            raise EngineNotReadyError("the engine is compiling its executables (warm-up)")
        return {"status": "ready"}

    if config.enable_control_endpoints:
        _add_control_endpoints(app, engine)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=n, root=n, max_model_len=state.max_model_len)
                                 for n in names])

    for path, probe in (("/health", health), ("/ready", ready), ("/v1/models", models)):
        # HEAD as GET (uvicorn sends no body), kept out of the schema: one operation a path
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses=_stream_doc(P.CompletionResponse))
    async def completions(req: P.CompletionRequest, raw: Request):
        state.check_request(req)
        with state.queue(state.count_prompts(req)) as places:
            prompts = await state.offload(state.prompts, req.prompt)
            jobs = [(p, state.params(req, len(p.token_ids), req.max_tokens, req.logprobs)) for p in prompts]
            state.check_tokens(req, jobs)
            fmt = F.CompletionFormatter(req, names[0], [(p.text, p.token_ids) for p in prompts],
                                        state.decode, state.tokenizer)
            return await state.respond(raw, req, jobs, fmt, places)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses=_stream_doc(P.ChatCompletionResponse))
    async def chat_completions(req: P.ChatCompletionRequest, raw: Request):
        state.check_request(req)
        state.check_sequences(req, 1)
        with state.queue(1) as places:
            ids = await state.offload(state.chat_ids, req.messages, req.add_generation_prompt)
            max_tokens = req.max_completion_tokens or req.max_tokens
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            jobs = [(ProcessedPrompt(None, ids), state.params(req, len(ids), max_tokens, logprobs, "messages"))]
            state.check_tokens(req, jobs)
            fmt = F.ChatFormatter(req, names[0], [(None, ids)], state.decode, state.tokenizer)
            return await state.respond(raw, req, jobs, fmt, places)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=_ERRORS)
    async def tokenize(req: P.TokenizeRequest):
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequestError("messages is empty", "messages")
            ids = await state.offload(state.chat_ids, req.messages, req.add_generation_prompt)
        else:
            ids = await state.offload(state.text_ids, req.prompt, req.add_special_tokens)
        return P.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=list(ids))

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(req: P.DetokenizeRequest):
        state.check_model(req.model)
        if req.tokens:
            state.inputs.check_token_ids(req.tokens, "tokens")
        return P.DetokenizeResponse(prompt=await state.offload(state.ids_text, req.tokens))

    _finish_schema(app, {"token_id": state.vocab_size - 1, "n": config.max_n,
                         "logprobs": state.max_logprobs, "max_tokens": state.max_model_len - 1})
    app.add_middleware(Guard, api_key=config.api_key, max_bytes=config.max_request_bytes,
                       protect_all=config.protect_metrics_and_docs, on_error=state.metrics.error)
    return app


def _add_control_endpoints(app: FastAPI, engine: EngineClient) -> None:
    """Research pipelines (vLLM's RL endpoints): pause generation around a weight update,
    and free the engine's memory while training. Blocking calls run in a worker thread."""
    @app.post("/pause", responses={**_STATE_ERRORS, 202: {"description": "still pausing"}})
    async def pause(mode: str = "wait", timeout: float | None = None) -> dict[str, str]:
        """Pause generation: `wait` lets the requests in flight finish (up to `timeout`
        seconds, then 202 "pausing"), `abort` ends them, `keep` freezes them until /resume.
        Requests that come meanwhile wait."""
        if mode not in PAUSE_MODES:
            raise InvalidRequestError(f"mode must be one of {PAUSE_MODES}, got {shorten(mode)!r}", "mode")
        try:
            await asyncio.to_thread(engine.pause, mode, timeout)
        except TimeoutError:
            return JSONResponse({"status": "pausing"}, status_code=202)
        return {"status": "paused"}

    @app.post("/resume", responses=_STATE_ERRORS)
    async def resume() -> dict[str, str]:
        await asyncio.to_thread(engine.resume)
        return {"status": "running"}

    @app.get("/is_paused", responses=_STATE_ERRORS)
    async def is_paused() -> dict[str, bool]:
        return {"is_paused": await asyncio.to_thread(engine.is_paused)}

    @app.post("/sleep", responses=_STATE_ERRORS)
    async def sleep(level: int = 1) -> dict[str, str]:
        """Free the KV pool (level 1: the weights go to host memory; level 2: they are
        dropped, and must come back through update_weights in the engine's process)."""
        if level not in (1, 2):
            raise InvalidRequestError(f"level must be 1 or 2, got {level}", "level")
        await asyncio.to_thread(engine.sleep, level)
        return {"status": "sleeping"}

    @app.post("/wake_up", responses=_STATE_ERRORS)
    async def wake_up() -> dict[str, str]:
        await asyncio.to_thread(engine.wake_up)
        return {"status": "awake"}

    @app.get("/is_sleeping", responses=_STATE_ERRORS)
    async def is_sleeping() -> dict[str, bool]:
        return {"is_sleeping": await asyncio.to_thread(engine.is_sleeping)}


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
