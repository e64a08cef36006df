"""The engine core in a process of its own (vLLM V1's EngineCoreProc), for the server.

`EngineCoreClient` starts it as `python -m jpaged.engine.core_proc CONFIG` (a fresh
interpreter: never a fork of a process that runs JAX, and never a re-run of the user's
script, as multiprocessing's spawn would do). It loads the model, sends a `Handshake`,
warms up, sends `Ready`, then loops: take the front end's messages (blocking only while
idle), run one step, send what it advanced as one `Outputs` message of deltas. All the
HTTP, JSON, prompt tokenization and SSE work stays in the front end's process and GIL.

It exits on `Stop`, when the front end's process goes away, or on a fatal error (the
front end sees the exit and answers 503). Ctrl-C reaches the whole process group: the
core ignores it, so the front end can drain the streams in flight and then stop it.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import sys
import time

import msgspec
import zmq

from jpaged.engine.messages import (UTILITY_METHODS, Abort, AddRequest, Failed, Handshake,
                                    Outputs, Ready, Stop, ToCore, Utility, UtilityResult,
                                    error_message, request_delta)

logger = logging.getLogger("jpaged.engine.core_proc")

IDLE_POLL_MS = 500  # how often an idle core checks that its front end is still there


class EngineCoreProc:
    def __init__(self, core, to_core: zmq.Socket, from_core: zmq.Socket, parent_pid: int):
        self.core = core
        self.to_core, self.from_core = to_core, from_core
        self.parent_pid = parent_pid
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(ToCore)

    def send(self, msg) -> None:
        self.from_core.send(self.encoder.encode(msg), copy=False)

    def run(self, warmup: bool) -> None:
        core = self.core
        warmup_s = core.warmup(use_tqdm=False) if warmup else None
        self.send(Ready(warmup_s, len(core.runner.executables)))
        self.send(Outputs([], core.snapshot()))
        core.run_loop(self.drain, self.deliver, self.step_failed)

    def deliver(self, requests) -> None:
        self.send(Outputs([request_delta(r) for r in requests], self.core.snapshot()))

    def drain(self, wait_s: float | None) -> bool:
        """Run the messages that came, waiting up to `wait_s` for the first (None: while idle;
        it checks on its front end every IDLE_POLL_MS meanwhile); False on Stop, or when the
        front end's process is gone."""
        while True:
            if os.getppid() != self.parent_pid:
                logger.error("the front end (pid %d) is gone: the engine core stops", self.parent_pid)
                return False
            timeout_ms = IDLE_POLL_MS if wait_s is None else int(wait_s * 1000)
            if not timeout_ms or self.to_core.poll(timeout_ms):
                break
            if wait_s is not None:
                return True
        changed = False
        while True:
            try:
                raw = self.to_core.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            msg = self.decoder.decode(raw.buffer)
            if isinstance(msg, Stop):
                return False
            changed = True
            if isinstance(msg, AddRequest):
                self.add(msg)
            elif isinstance(msg, Abort):
                for request_id in msg.request_ids:
                    self.core.abort_request(request_id)
            elif isinstance(msg, Utility):
                self.utility(msg)
        if changed:
            self.send(Outputs([], self.core.snapshot()))
        return True

    def add(self, msg: AddRequest) -> None:
        from jpaged.engine.input_processor import ProcessedPrompt
        from jpaged.sampling_params import SamplingParams
        try:  # the front end checked the prompt and params already
            self.core.add_request(ProcessedPrompt(msg.prompt, msg.prompt_token_ids),
                                  SamplingParams(**msg.params), request_id=msg.request_id,
                                  client_request_id=msg.client_request_id)
        except (ValueError, TypeError) as e:
            self.send(error_message(msg.request_id, e))

    def utility(self, msg: Utility) -> None:
        try:
            if msg.method not in UTILITY_METHODS:
                raise ValueError(f"{msg.method!r} is not one of {sorted(UTILITY_METHODS)}")
            if msg.method == "pause":  # the requests it aborts get their final output
                self.deliver(self.core.pause_requests(*msg.args))
                result = None
            else:
                result = getattr(self.core, msg.method)(*msg.args)
            self.send(UtilityResult(msg.call_id, result, None))
        except Exception as e:  # noqa: BLE001 - handed to the caller
            self.send(UtilityResult(msg.call_id, None, f"{type(e).__name__}: {e}"))

    def step_failed(self, error: Exception) -> None:
        from jpaged.exceptions import EngineStepError
        logger.exception("engine step failed; aborting the %d requests in flight",
                         len(self.core.requests))
        failure = EngineStepError(f"the engine step failed: {error!r}")
        for request_id in list(self.core.requests):
            self.core.abort_request(request_id)
            self.send(error_message(request_id, failure))
        self.send(Outputs([], self.core.snapshot()))

    def stop(self) -> None:
        for request_id in list(self.core.requests):
            self.core.abort_request(request_id)


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    logging.basicConfig(level=config["log_level"].upper(),
                        format="%(levelname)s %(asctime)s [engine core] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    to_core, from_core = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    to_core.connect(config["to_core"])
    from_core.connect(config["from_core"])
    from_core.setsockopt(zmq.LINGER, 5000)  # the last messages reach the front end
    encoder = msgspec.msgpack.Encoder()
    start = time.perf_counter()
    try:
        from jpaged.engine.engine_core import EngineCore
        core = EngineCore(config["model"], **config["engine_args"])
    except Exception as e:  # noqa: BLE001 - the front end reports it
        logger.exception("the engine core could not start")
        from_core.send(encoder.encode(Failed(f"{type(e).__name__}: {e}")))
        return 1
    cfg = core.config
    from_core.send(encoder.encode(Handshake(
        pickle.dumps(core.tokenizer), core.model_config.vocab_size, core.max_model_len,
        cfg.max_logprobs, cfg.max_num_seqs, dict(core.generation_config), core.model_path,
        core.is_default_model, time.perf_counter() - start)))
    proc = EngineCoreProc(core, to_core, from_core, config["parent_pid"])
    try:
        proc.run(config["warmup"])
    finally:
        proc.stop()
        from_core.close()
        to_core.close(linger=0)
        ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
