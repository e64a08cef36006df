"""The engine loop in a background thread, streaming outputs to asyncio consumers
(docs/design.md, "Serving").

The engine core (an `LLM`) is synchronous and single-threaded, and a JAX step blocks,
so one thread owns it and makes every call on it. Coroutines talk to that thread
through a command queue: `generate()` queues an "add" and then awaits the
request's own asyncio queue, which the engine thread fills after each step
through `loop.call_soon_threadsafe`; leaving `generate()` early (the consumer
stops, or its task is cancelled because the client went away) queues an
"abort", which frees the request's KV blocks before the next step. An idle
engine blocks on the command queue, so it uses no CPU between requests.

    engine = AsyncEngine(LLM(...))            # starts the thread
    async for out in engine.generate(prompt, SamplingParams(max_tokens=8)):
        print(out.outputs[0].text)            # cumulative text, as LLM.step gives it
    engine.shutdown()

The consumer side (`generate`, `generate_many`) is `EngineClient`'s; `EngineCoreClient` is the
same engine in a process of its own.
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from typing import Any, Callable

from jpaged.exceptions import EngineDeadError, EngineStateError, EngineStepError
from jpaged.sampling_params import SamplingParams

from .engine_client import EngineClient, ModelInfo, _Stream, send_to_streams

logger = logging.getLogger("jpaged.engine.async_engine")


class AsyncEngine(EngineClient):
    """Owns `core` (an EngineCore, such as an LLM) from now on: after construction, call
    its methods only through this."""

    def __init__(self, core, *, name: str = "jpaged-engine", warmup: bool = False):
        """`warmup`: the thread first compiles every executable a request can need
        (`EngineCore.warmup`); requests queued meanwhile run after it, and `ready` is set
        when it is done (at once without warm-up)."""
        self.core = core
        # The engine thread detokenizes with core.tokenizer; the front end gets a copy.
        self.info = ModelInfo(copy.deepcopy(core.tokenizer), core.model_config.vocab_size,
                              core.max_model_len, core.config.max_logprobs, core.config.max_num_seqs,
                              dict(core.generation_config), core.model_path, core.is_default_model)
        self.ready = threading.Event()
        self.warmup_s: float | None = None
        self._warmup = warmup
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # touched by the engine thread only
        self._stopping = False
        self.dead: BaseException | None = None
        self.snapshot: dict[str, Any] = {}
        self._publish()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- the consumer side (any thread, usually the event loop's) ---------------------------

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    def _submit(self, stream: _Stream, prompt, params: SamplingParams) -> None:
        self._commands.put(("add", stream, prompt, params))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call_sync(self, fn: Callable, *args, timeout: float | None = None) -> Any:
        """Run `fn(core, *args)` on the engine thread between steps and return its result
        (from a plain thread: tests, scripts)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run(core):
            try:
                box["value"] = fn(core, *args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e
            done.set()
        self._commands.put(("call", run))
        if not done.wait(timeout):
            raise TimeoutError("the engine thread did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def call_utility(self, method: str, *args, timeout: float | None = None) -> Any:
        if method == "pause":  # the requests it aborts get their final output
            return self.call_sync(lambda core: self._deliver(core.pause_requests(*args)), timeout=timeout)
        return self.call_sync(lambda core: getattr(core, method)(*args), timeout=timeout)

    def update_weights(self, params, timeout: float | None = None) -> None:
        """`EngineCore.update_weights` between steps; the engine must be paused (`pause`)."""
        def update(core):
            if not core.paused:
                raise EngineStateError("the engine is running: pause(mode='wait' | 'abort' | "
                                       "'keep') before update_weights, resume() after")
            core.update_weights(params)
        self.call_sync(update, timeout=timeout)

    def get_weights(self, timeout: float | None = None):
        return self.call_sync(lambda core: core.get_weights(), timeout=timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort everything, stop the thread and wait for it (a step in flight finishes)."""
        self._stopping = True
        self._commands.put(("stop",))
        self._thread.join(timeout)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        core = self.core
        try:
            if self._warmup:
                self.warmup_s = core.warmup(use_tqdm=False)
                logger.warning("compiled or loaded %d executables in %.1f s",
                               len(core.runner.executables), self.warmup_s)
                self._publish()
            self.ready.set()
            core.run_loop(self._drain, self._deliver, self._step_failed)
        except BaseException as e:  # noqa: BLE001
            logger.exception("engine thread died")
            self.dead = e
        finally:
            # a consumer gets EngineDeadError (a 503), never the thread's own BaseException
            self._fail_all(EngineDeadError(f"the engine thread died: {self.dead!r}") if self.dead
                           else EngineDeadError("the engine was shut down"))
            self._publish()

    def _drain(self, wait_s: float | None) -> bool:
        """Run queued commands, waiting up to `wait_s` for the first (None: until one comes);
        False on "stop"."""
        changed = False
        while True:
            try:
                cmd = self._commands.get(timeout=wait_s) if wait_s != 0 else self._commands.get_nowait()
            except queue.Empty:
                break
            wait_s = 0
            kind = cmd[0]
            if kind == "stop":
                return False
            if kind == "add":
                self._add(*cmd[1:])
                changed = True
            elif kind == "abort":
                stream = self._streams.pop(cmd[1], None)
                if stream is not None:
                    self.core.abort_request(cmd[1])
                    changed = True
            elif kind == "call":
                cmd[1](self.core)
        if changed:
            self._publish()
        return True

    def _add(self, stream: _Stream, prompt, params) -> None:
        if self._stopping:
            self._send([(stream, EngineDeadError("the engine is shutting down"))])
            return
        if stream.request_id in self._streams:
            self._send([(stream, ValueError(f"request_id {stream.request_id!r} is already running"))])
            return
        try:
            self.core.add_request(prompt, params, request_id=stream.request_id,
                                  client_request_id=stream.client_request_id)
        except (ValueError, TypeError) as e:
            self._send([(stream, e)])
            return
        self._streams[stream.request_id] = stream

    def _deliver(self, requests) -> None:
        items = []
        for out in map(self.core.output_processor.request_output, requests):
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            items.append((stream, out))
        self._send(items)
        self._publish()

    def _send(self, items: list[tuple[_Stream, Any]]) -> None:
        for stream in send_to_streams(items):  # their consumers are gone
            if self._streams.pop(stream.request_id, None) is not None:
                self.core.abort_request(stream.request_id)

    def _step_failed(self, error: Exception) -> None:
        logger.exception("engine step failed; aborting the %d requests in flight",
                         len(self._streams))
        self._fail_all(EngineStepError(f"the engine step failed: {error!r}"))
        for request_id in list(self.core.requests):
            self.core.abort_request(request_id)
        self._publish()

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            try:
                self.core.abort_request(stream.request_id)
            except Exception:  # noqa: BLE001
                logger.exception("abort of %s failed", stream.request_id)
        self._send([(s, error) for s in streams])

    def _publish(self) -> None:
        """A snapshot of the engine's state for other threads (metrics, health)."""
        try:
            snap = self.core.snapshot()
        except Exception:  # noqa: BLE001 - an engine mid-change must not kill the loop
            logger.exception("could not read the engine's stats")
            return
        self.snapshot = snap
