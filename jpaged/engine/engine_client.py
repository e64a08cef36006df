"""What the server sees of an engine, wherever it runs: `EngineClient` streams each request's
RequestOutputs to asyncio consumers. Two engines implement it: `AsyncEngine` (the engine
core in a thread of this process) and `EngineCoreClient` (the engine core in a process of
its own). Host only: no jax.

Each request has a `_Stream`: an asyncio queue on its consumer's event loop, which the
engine side fills through `loop.call_soon_threadsafe` (one call per loop per step).
Leaving `generate()` early (the consumer stops, or its task is cancelled because the
client went away) aborts the request, which frees its KV blocks before the next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import uuid
from typing import Any, AsyncIterator

from jpaged.exceptions import EngineDeadError, EngineStateError
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the front end needs of the loaded model to check and render requests."""
    tokenizer: Any
    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_num_seqs: int
    generation_config: dict[str, Any]
    model_path: str | None  # None: an in-memory model
    is_default_model: bool  # the embedded SmolLM2-135M-Instruct


# What `pause` does with the requests in flight (vLLM's pause_generation modes; EngineCore.pause).
PAUSE_MODES = ("wait", "abort", "keep")
PAUSE_POLL_S = 0.02


class _Stream:
    """The consumer side of one request: an asyncio queue on the consumer's loop."""

    __slots__ = ("loop", "queue", "request_id", "client_request_id", "finished", "state")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop,
                 client_request_id: str | None = None):
        self.request_id = request_id
        self.client_request_id = client_request_id  # EngineCore.add_request's
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.state: Any = None  # the engine side's own (EngineCoreClient: the accumulator)


def _deliver(items: list[tuple[_Stream, Any]]) -> None:  # runs on the consumer's loop
    for stream, item in items:
        stream.queue.put_nowait(item)


def send_to_streams(items: list[tuple[_Stream, Any]]) -> list[_Stream]:
    """Hand each item (a RequestOutput or an exception) to its stream's loop; return the
    streams whose loop is closed (their consumers are gone)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    gone = []
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # that loop is closed
            gone.extend(stream for stream, _ in batch)
    return gone


class EngineClient:
    """The consumer side. Subclasses set `info` (a ModelInfo), `ready` (set once no request
    waits for a compilation), `dead`, `warmup_s` and `snapshot` (the engine's stats for
    /metrics), and implement `_submit(stream, prompt, params)`, `abort`, `call_utility`,
    `alive` and `shutdown`."""

    info: ModelInfo
    ready: threading.Event
    dead: BaseException | None
    warmup_s: float | None
    snapshot: dict[str, Any]

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def _submit(self, stream: _Stream, prompt, params: SamplingParams) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def call_utility(self, method: str, *args, timeout: float | None = None) -> Any:
        """`EngineCore.<method>(*args)` run between steps (messages.UTILITY_METHODS)."""
        raise NotImplementedError

    def shutdown(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    # ---- pausing and sleeping (blocking: call from a thread, not from the event loop) ---------

    def pause(self, mode: str = "wait", timeout: float | None = None) -> None:
        """Pause generation (`EngineCore.pause_requests`) and return once the engine is paused:
        "abort" and "keep" at once, "wait" when the requests in flight have finished
        (TimeoutError after `timeout` seconds; the engine then goes on pausing). Requests
        that come meanwhile wait for `resume`; aborted ones end with finish_reason "abort"."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        self.call_utility("pause", mode)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.call_utility("is_paused"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"requests still in flight after {timeout} s; the engine "
                                   "pauses when they finish (or pause(mode='abort'))")
            time.sleep(PAUSE_POLL_S)

    def resume(self) -> None:
        self.call_utility("resume")

    def is_paused(self) -> bool:
        return bool(self.call_utility("is_paused"))

    def sleep(self, level: int = 1) -> None:
        """`EngineCore.sleep`: free the KV pool (and the weights at level 2)."""
        self.call_utility("sleep", level)

    def wake_up(self) -> None:
        self.call_utility("wake_up")

    def is_sleeping(self) -> bool:
        return bool(self.call_utility("is_sleeping"))

    def update_weights(self, params) -> None:
        """`EngineCore.update_weights`, on a paused engine of this process (AsyncEngine)."""
        raise EngineStateError("the engine core runs in a process of its own: weights are "
                               "updated in place only in the training process (LLM, or "
                               "jpaged.serve(llm) / start_server(engine_process=False))")

    def get_weights(self):
        raise EngineStateError("the engine core runs in a process of its own: get_weights "
                               "works in-process (LLM, AsyncEngine)")

    async def generate(self, prompt, params: SamplingParams, request_id: str | None = None,
                       client_request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue one request and yield its RequestOutputs as steps advance it; the last
        one has `finished=True`. A bad prompt or params raise here (ValueError/TypeError)
        before any output. Leaving early aborts. `client_request_id`: the client request
        it is part of (admission takes turns between client requests)."""
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.dead!r}")
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(request_id, asyncio.get_running_loop(), client_request_id)
        self._submit(stream, prompt, params)
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    stream.finished = True
                    raise item
                if item.finished:
                    stream.finished = True
                yield item
                if stream.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def generate_many(self, jobs, disconnected=None, on_finish=None, on_abort=None,
                            client_request_id: str | None = None):
        """Run several requests at once, each job `(prompt, params, request_id)`, as parts of
        one client request (`client_request_id`, default: the first job's id); yield
        (job index, RequestOutput) as outputs come. Ends early (aborting what is left)
        when the coroutine function `disconnected` returns, or when the consumer leaves.
        `on_finish(arrival, first_token_time, RequestOutput)` is called per finished
        job (times from time.monotonic()); `on_abort()` per aborted one."""
        sink: asyncio.Queue = asyncio.Queue()
        gone = object()

        async def pump(i, prompt, params, request_id):
            arrival, first, out = time.monotonic(), None, None
            try:
                async with contextlib.aclosing(self.generate(prompt, params, request_id, client)) as agen:
                    async for out in agen:
                        if first is None and any(c.token_ids for c in out.outputs):
                            first = time.monotonic()
                        sink.put_nowait((i, out))
                if on_finish is not None and out is not None:
                    on_finish(arrival, first, out)
            except asyncio.CancelledError:
                if on_abort is not None and not (out is not None and out.finished):
                    on_abort()
                raise
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                sink.put_nowait((i, e))
                return
            sink.put_nowait((i, None))

        async def watch():
            await disconnected()
            sink.put_nowait((-1, gone))

        client = client_request_id if client_request_id is not None else (jobs[0][2] if jobs else None)
        tasks = [asyncio.create_task(pump(i, *job)) for i, job in enumerate(jobs)]
        if disconnected is not None:
            tasks.append(asyncio.create_task(watch()))
        try:
            remaining = len(jobs)
            while remaining:
                i, item = await sink.get()
                if item is gone:
                    return
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
