"""The server's front end to an engine core running in a process of its own
(`jpaged.engine.core_proc`), as vLLM V1's AsyncMPClient: this process does HTTP, prompt
tokenization and checks, response rendering and SSE, and never imports jax; the core
process does schedule -> step -> sample and detokenizes what it generates.

Two ZeroMQ sockets over IPC carry msgpack messages (`messages.py`): requests and aborts
go down one, and one `Outputs` message per step comes up the other with each advanced
request's delta. A receiver thread turns the deltas back into cumulative RequestOutputs
and hands them to the streams' event loops. When the core process dies the client is
dead: every stream gets `EngineDeadError`, and the server answers 503.

    engine = EngineCoreClient(None, {"max_num_seqs": 32}, warmup=True)
    async for out in engine.generate("Hello", SamplingParams(max_tokens=8)): ...
    engine.shutdown()
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

import msgspec
import zmq

from jpaged.engine.stats import EngineStats
from jpaged.exceptions import EngineDeadError, EngineStepError, InvalidRequestTypeError, JpagedError
from jpaged.sampling_params import SamplingParams

from .engine_client import EngineClient, ModelInfo, _Stream, send_to_streams
from .input_processor import InputProcessor
from .messages import (Abort, AddRequest, Failed, FromCore, Handshake, Outputs, OutputAccumulator,
                       Ready, RequestError, Stop, Utility, UtilityResult, params_to_dict,
                       rebuild_error)

logger = logging.getLogger("jpaged.engine.core_client")

POLL_MS = 200  # how often the receiver checks that the core process is alive


class EngineCoreClient(EngineClient):
    """Starts the engine core process for `model` (None or a path) with `engine_args`
    (EngineConfig fields) and returns once the model is loaded (its warm-up goes on
    in the background: `ready` is set when it is done). Raises if the core cannot start."""

    def __init__(self, model: str | os.PathLike | None, engine_args: dict[str, Any], *,
                 warmup: bool = False, log_level: str = "warning"):
        self.ready = threading.Event()
        self.dead: BaseException | None = None
        self.warmup_s: float | None = None
        self.snapshot: dict[str, Any] = {}
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, list] = {}  # utility call id -> [Event, result, error]
        self._call_ids = itertools.count()
        self._stopping = False
        self._lock = threading.Lock()  # one sender at a time on the zmq socket
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromCore)
        self._ipc_dir = tempfile.mkdtemp(prefix="jpaged-ipc-")
        self._ctx = zmq.Context()
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._from_core = self._ctx.socket(zmq.PULL)
        to_addr, from_addr = (f"ipc://{self._ipc_dir}/{name}" for name in ("to_core", "from_core"))
        self._to_core.bind(to_addr)
        self._from_core.bind(from_addr)
        config = {"model": None if model is None else os.fspath(model), "engine_args": engine_args,
                  "warmup": warmup, "to_core": to_addr, "from_core": from_addr,
                  "parent_pid": os.getpid(), "log_level": log_level}
        # The core imports the same jpaged as this process: its package root goes first on
        # the path, and -P keeps the working directory off it (a source checkout there would
        # shadow an installed jpaged).
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "jpaged.engine.core_proc",
                                      json.dumps(config)], env=env)
        try:
            handshake = self._handshake()
        except BaseException:
            self._close()
            raise
        self.info = ModelInfo(pickle.loads(handshake.tokenizer), handshake.vocab_size,
                              handshake.max_model_len, handshake.max_logprobs,
                              handshake.max_num_seqs, handshake.generation_config,
                              handshake.model_path, handshake.is_default_model)
        self.load_s = handshake.load_s
        self._inputs = InputProcessor(self.info.tokenizer, self.info.vocab_size,
                                      self.info.max_model_len)
        self._thread = threading.Thread(target=self._receive, name="jpaged-core-client",
                                        daemon=True)
        self._thread.start()

    def _handshake(self) -> Handshake:
        while not self._from_core.poll(POLL_MS):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine core process exited with code "
                                   f"{self.proc.returncode} while loading the model (see its log)")
        msg = self._decoder.decode(self._from_core.recv())
        if isinstance(msg, Failed):
            raise RuntimeError(f"the engine core could not start: {msg.error}")
        return msg

    # ---- the consumer side --------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.dead is None and self.proc.poll() is None

    def _send(self, msg) -> None:
        with self._lock:
            if not self._to_core.closed:
                self._to_core.send(self._encoder.encode(msg))

    def _submit(self, stream: _Stream, prompt, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestTypeError(
                f"sampling params must be SamplingParams, got {type(params).__name__}")
        prompt = self._inputs.process(prompt)  # the server's prompts come processed already
        if stream.request_id in self._streams:
            raise ValueError(f"request_id {stream.request_id!r} is already running")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        stream.state = OutputAccumulator(stream.request_id, prompt.text, prompt.token_ids)
        self._streams[stream.request_id] = stream
        self._send(AddRequest(stream.request_id, prompt.text, prompt.token_ids,
                              params_to_dict(params), stream.client_request_id))

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._send(Abort([request_id]))

    def call_utility(self, method: str, *args, timeout: float | None = None) -> Any:
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.dead!r}")
        call_id = next(self._call_ids)
        box = self._calls[call_id] = [threading.Event(), None, None]
        self._send(Utility(call_id, method, list(args)))
        if not box[0].wait(timeout):
            self._calls.pop(call_id, None)
            raise TimeoutError(f"the engine core did not answer {method}() in time")
        if box[2] is not None:  # "Kind: message", as the core's utility() sends it
            kind, _, message = box[2].partition(": ")
            error = rebuild_error(RequestError("", kind, message, None))
            raise error if kind in ("ValueError", "TypeError") or isinstance(error, JpagedError) \
                and not isinstance(error, EngineStepError) else RuntimeError(box[2])
        return box[1]

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what runs, stop the core process (killing it if it does not stop within
        `timeout`) and the receiver."""
        self._stopping = True
        if self.proc.poll() is None:
            self._send(Stop())
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("the engine core did not stop in %.0f s: killing it", timeout)
                self.proc.kill()
                self.proc.wait()
        self._thread.join(timeout)
        self._fail_all(self.dead or EngineDeadError("the engine was shut down"))
        self._close()

    def _close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with self._lock:
            self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    # ---- the receiver thread ------------------------------------------------------------------

    def _receive(self) -> None:
        try:
            while True:
                if not self._from_core.poll(POLL_MS):
                    if self.proc.poll() is not None:
                        self._died()
                        return
                    continue
                self._handle(self._decoder.decode(self._from_core.recv(copy=False).buffer))
        except zmq.ContextTerminated:
            pass
        except BaseException as e:  # noqa: BLE001
            logger.exception("the engine-core client's receiver failed")
            self.dead = e
            self._fail_all(e)

    def _handle(self, msg) -> None:
        if isinstance(msg, Outputs):
            items = []
            for delta in msg.requests:
                stream = self._streams.get(delta.request_id)
                if stream is None:  # aborted meanwhile
                    continue
                if delta.finished:
                    self._streams.pop(delta.request_id, None)
                items.append((stream, stream.state.add(delta)))
            for stream in send_to_streams(items):  # their consumers are gone
                self.abort(stream.request_id)
            if msg.snapshot is not None:
                snap = msg.snapshot
                snap["stats"] = EngineStats(**snap["stats"])
                self.snapshot = snap
        elif isinstance(msg, RequestError):
            stream = self._streams.pop(msg.request_id, None)
            if stream is not None:
                send_to_streams([(stream, rebuild_error(msg))])
        elif isinstance(msg, Ready):
            self.warmup_s = msg.warmup_s
            if msg.warmup_s is not None:
                logger.warning("compiled or loaded %d executables in %.1f s",
                               msg.num_executables, msg.warmup_s)
            self.ready.set()
        elif isinstance(msg, UtilityResult):
            box = self._calls.pop(msg.call_id, None)
            if box is not None:
                box[1], box[2] = msg.result, msg.error
                box[0].set()

    def _died(self) -> None:
        if self._stopping:
            return
        code = self.proc.returncode
        logger.error("the engine core process (pid %d) exited with code %s; the server answers "
                     "503 from now on", self.proc.pid, code)
        self.dead = EngineDeadError(f"the engine core process exited with code {code}")
        self._fail_all(self.dead)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        send_to_streams([(s, error) for s in streams])
        calls, self._calls = list(self._calls.values()), {}
        for box in calls:
            box[2] = repr(error)
            box[0].set()
