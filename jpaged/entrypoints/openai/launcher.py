"""Running the OpenAI-compatible server: uvicorn in a thread around one engine.

    import jpaged
    jpaged.serve()                               # blocks: http://127.0.0.1:8000/v1

    handle = jpaged.start_server(port=0)         # returns once it accepts connections
    client = openai.OpenAI(base_url=handle.url + "/v1", api_key="unused")
    ...
    handle.shutdown()

Binds 127.0.0.1 unless told otherwise; `api_key` makes every /v1, /tokenize and
/detokenize request need `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import threading
import time

from jpaged.config import EngineConfig
from jpaged.engine.engine_client import EngineClient, ModelInfo
from jpaged.exceptions import EngineDeadError

from .api_server import APP_FIELDS, create_app
from .config import DEFAULT_MODEL_NAME, ServerConfig
from .http_protocol import protocol_class

logger = logging.getLogger("jpaged.entrypoints.openai")


def default_model_name(info: ModelInfo) -> str:
    """The model file's stem (a folder's name); SmolLM2-135M-Instruct for the default model,
    "model" for an in-memory one."""
    if info.is_default_model:
        return DEFAULT_MODEL_NAME
    if info.model_path is None:
        return "model"
    path = pathlib.Path(info.model_path)
    return path.name if path.is_dir() else path.stem


class ServerHandle:
    """A server running in a background thread: `.url` ("http://127.0.0.1:PORT"), `.engine`
    (an EngineClient: `.engine.call_utility("kv_cache_stats")` runs on the engine between
    steps), `.app`, and `.shutdown()`, which stops uvicorn and then the engine (if it owns it).
    `server`: the ServerConfig whose host, port and connection settings it runs with
    (default: 127.0.0.1, a free port, ServerConfig's limits)."""

    def __init__(self, app, engine, server: ServerConfig | None = None, own_engine: bool = True):
        import uvicorn
        server = server or ServerConfig(port=0, log_level="warning")
        self.app, self.engine, self.own_engine = app, engine, own_engine
        _fit_open_file_limit(server.max_connections)
        # Shutting down, uvicorn stops accepting connections and waits up to
        # `shutdown_timeout` for the open ones (streams in flight) to finish.
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=server.host, port=server.port, log_level=server.log_level, lifespan="off",
            timeout_graceful_shutdown=server.shutdown_timeout,
            timeout_keep_alive=server.timeout_keep_alive,
            http=protocol_class(server.header_timeout, server.body_timeout, server.max_connections)))
        self.thread = threading.Thread(target=self.server.run, name="jpaged-uvicorn", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                self.shutdown()
                raise RuntimeError(f"the server did not start on {server.host}:{server.port} (see the log)")
            time.sleep(0.01)
        self.host, self.port = server.host, self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host if ':' not in self.host else f'[{self.host}]'}:{self.port}"

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting connections, let those open finish (up to `shutdown_timeout`),
        then stop the engine (aborting what is left) if this handle owns it."""
        timeout = self.server.config.timeout_graceful_shutdown + 30 if timeout is None else timeout
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.own_engine:
            self.engine.shutdown(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def _fit_open_file_limit(max_connections: int) -> None:
    """Raise the soft open-file limit (often 1,024) so that `max_connections` sockets fit
    beside the server's own files; warn when the hard limit is lower."""
    import resource
    want = max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            logger.warning("the open-file limit (%d) is below max_connections + 256: lower "
                           "--max-connections or raise `ulimit -n`", new)


SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}


def start_server(model=None, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                 params=None, tokenizer=None, **kwargs) -> ServerHandle:
    """Load the model, start the engine and uvicorn in background threads, and return once
    the server accepts connections: `with start_server(port=0) as h: ... h.url ...`.
    `model`: a path, None for the embedded default, an in-memory Flax model (with `params=`
    and `tokenizer=`) or an `LLM` (an EngineCore), which the server then owns;
    `kwargs`: `ServerConfig` fields (served_model_name, api_key, the limits, warmup, ...)
    and `EngineConfig` fields. `warmup` (default):
    the engine thread first compiles, or loads from disk, every executable a request can
    need (`LLM.warmup`), so no request waits for a compilation; the server answers meanwhile
    (`/health` 200, `/ready` 503, requests queue). `engine_process` (default): a model given
    as a path (or None) runs in an engine-core process of its own (`EngineCoreClient`), and
    this process, which then never imports jax, does HTTP; an in-memory model or an LLM runs
    in a thread of this process (`AsyncEngine`). `port=0` picks a free port. To serve another
    app (say with an API key) over the same engine:
    `ServerHandle(create_app(h.engine, api_key=KEY), h.engine, own_engine=False)`."""
    server = ServerConfig(host=host, port=port, log_level=log_level,
                          **{k: v for k, v in kwargs.items() if k in SERVER_FIELDS})
    engine_args = {k: v for k, v in kwargs.items() if k not in SERVER_FIELDS}
    engine = _start_engine(model, server, params, tokenizer, engine_args)
    try:
        names = server.served_model_name or default_model_name(engine.info)
        app = create_app(engine, names, **{f: getattr(server, f) for f in APP_FIELDS})
        return ServerHandle(app, engine, server)
    except BaseException:
        engine.shutdown()
        raise


def _start_engine(model, server: ServerConfig, params, tokenizer, engine_args) -> EngineClient:
    from_path = model is None or isinstance(model, (str, os.PathLike))
    if server.engine_process and from_path and params is None and tokenizer is None:
        from jpaged.engine.core_client import EngineCoreClient
        EngineConfig(**engine_args)  # bad arguments fail here, before a process starts
        return EngineCoreClient(model, engine_args, warmup=server.warmup,
                                log_level="warning" if server.log_level == "info" else server.log_level)
    from jpaged.engine.async_engine import AsyncEngine
    from jpaged.engine.engine_core import EngineCore
    if isinstance(model, EngineCore):
        core = model
    else:
        from jpaged.entrypoints.llm import LLM
        core = LLM(model, params=params, tokenizer=tokenizer, **engine_args)
    return AsyncEngine(core, warmup=server.warmup)


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          **kwargs) -> None:
    """Serve until Ctrl-C or SIGTERM, which drain the requests in flight (up to
    `shutdown_timeout`) before stopping (the arguments of `start_server`). If the engine
    dies, the server answers 503 meanwhile and this stops and raises `EngineDeadError`.
    In a thread, or for a handle to stop it, use `start_server` instead."""
    handle = start_server(model, host, port, log_level=log_level, **kwargs)
    logger.warning("jpaged serving %s at %s/v1", handle.app.state.jpaged.names[0], handle.url)
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it as Ctrl-C does
        import signal
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # Not thread.join(0.5): a join that SIGTERM's KeyboardInterrupt breaks leaves the
        # thread marked stopped on Python 3.11, and the drain below would not wait for it.
        while handle.thread.is_alive() and handle.engine.alive:
            time.sleep(0.25)
    except KeyboardInterrupt:
        logger.warning("shutting down: finishing the requests in flight")
    finally:
        handle.shutdown()
    if handle.engine.dead is not None:
        logger.error("the engine died (%r); the server has stopped", handle.engine.dead)
        raise EngineDeadError(f"the engine died: {handle.engine.dead!r}") from handle.engine.dead
