"""The server's life around its requests: SIGTERM lets the streams in flight finish before
the process exits, and an engine that dies makes the server answer 503 and stop with an
error instead of hanging."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from helpers import TINY_SERVER_ARGS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream_tokens(url: str, max_tokens: int, started: threading.Event) -> tuple[int, bool]:
    """(tokens the usage chunk reports, whether [DONE] came) of one streamed completion."""
    tokens, done = 0, False
    body = {"model": "tiny", "prompt": "drain me", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk.get("choices"):
                    started.set()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens, done


def test_sigterm_drains_streams_in_flight(tiny_text_model, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_SERVER_ARGS.items()]
    proc = subprocess.Popen([sys.executable, "-m", "jpaged", "serve", "--model", tiny_text_model,
                             "--port", str(port), "--served-model-name", "tiny", "--no-warmup",
                             "--log-level", "warning", *flags],
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)  # the installed package, not a checkout's jpaged/
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        started = [threading.Event() for _ in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(_stream_tokens, url, 100, ev) for ev in started]
            for ev in started:
                assert ev.wait(60)
            proc.send_signal(signal.SIGTERM)
            results = [s.result() for s in streams]
        # Every stream in flight ran to its end: all its tokens and [DONE].
        assert results == [(100, True)] * 4
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):  # and nothing new is accepted
            httpx.get(url + "/health", timeout=2)
        assert "finishing the requests in flight" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dead_engine_answers_503_and_serve_stops(tiny_text_model, monkeypatch):
    from jpaged.entrypoints.openai import launcher
    from jpaged.exceptions import EngineDeadError
    handles = []
    start = launcher.start_server

    def capture(*args, **kw):
        handles.append(start(*args, **kw))
        return handles[-1]
    monkeypatch.setattr(launcher, "start_server", capture)
    errors = []

    def run():
        try:
            launcher.serve(tiny_text_model, port=0, warmup=False, log_level="warning",
                           served_model_name="tiny", **TINY_SERVER_ARGS)
        except EngineDeadError as e:
            errors.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while not handles:
        assert time.time() < deadline
        time.sleep(0.1)
    h = handles[0]
    assert httpx.get(h.url + "/health").status_code == 200
    # A second app over the same engine outlives serve()'s own server, to ask after the death.
    other = launcher.ServerHandle(launcher.create_app(h.engine, "tiny"), h.engine, own_engine=False)

    def die(core):
        raise SystemExit("simulated crash of the engine thread")
    h.engine._commands.put(("call", die))  # what an unexpected BaseException in the loop does
    while h.engine.alive:
        time.sleep(0.05)
    r = httpx.post(other.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert httpx.get(other.url + "/health").status_code == 503
    other.shutdown()
    thread.join(60)
    assert not thread.is_alive()  # serve() stopped by itself
    assert errors and "simulated crash" in str(errors[0])
