"""The server's life around its requests: SIGTERM lets the streams in flight finish before
the process exits (and the engine-core process with it), an engine that dies (a crashed
thread, a killed core process) makes the server answer 503 and stop with an error instead
of hanging, and the front end of a server with an engine-core process never imports jax."""
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
        deadline = time.time() + 30  # the engine-core process is gone too
        while _core_processes(proc.pid):
            assert time.time() < deadline, "the engine core outlived its server"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()


def _core_processes(parent_pid: int) -> list[int]:
    """Pids of live engine-core processes started by `parent_pid` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"jpaged.engine.core_proc" in args and state != "Z" and \
                json.loads(args[args.index(b"jpaged.engine.core_proc") + 1])["parent_pid"] == parent_pid:
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize("engine_process", [True, False], ids=["core-process", "in-process"])
def test_dead_engine_answers_503_and_serve_stops(tiny_text_model, monkeypatch, engine_process):
    """The engine dies with a request in flight: that request gets an error, every route
    answers 503, and serve() stops by itself with EngineDeadError."""
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
                           served_model_name="tiny", engine_process=engine_process,
                           **TINY_SERVER_ARGS)
        except EngineDeadError as e:
            errors.append(e)
    thread = threading.Thread(target=run, daemon=True)  # a failing test must not hang pytest
    thread.start()
    deadline = time.time() + 120
    while not handles:
        assert time.time() < deadline
        time.sleep(0.1)
    h = handles[0]
    assert httpx.get(h.url + "/health").status_code == 200
    # A second app over the same engine outlives serve()'s own server, to ask after the death.
    other = launcher.ServerHandle(launcher.create_app(h.engine, "tiny"), h.engine, own_engine=False)

    in_flight = concurrent.futures.ThreadPoolExecutor(1).submit(
        httpx.post, h.url + "/v1/completions", timeout=60,
        json={"model": "tiny", "prompt": "x", "max_tokens": 120, "ignore_eos": True})
    while h.engine.snapshot.get("num_running", 0) == 0:
        time.sleep(0.01)
    if engine_process:
        assert h.engine.proc.pid in _core_processes(os.getpid())
        os.kill(h.engine.proc.pid, signal.SIGKILL)
    else:
        def die(core):
            raise SystemExit("simulated crash of the engine thread")
        h.engine._commands.put(("call", die))  # what an unexpected BaseException in the loop does
    while h.engine.alive:
        time.sleep(0.05)
    r = in_flight.result()
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    r = httpx.post(other.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert httpx.get(other.url + "/health").status_code == 503
    other.shutdown()
    thread.join(60)
    assert not thread.is_alive()  # serve() stopped by itself
    assert errors and ("exited with code -9" if engine_process else "simulated crash") in str(errors[0])


def test_front_end_imports_no_jax(tiny_text_model, tmp_path):
    """With the engine core in its own process, the server's process serves a completion
    without ever importing jax (nor does importing jpaged's server API)."""
    script = f"""
import sys
import httpx
import jpaged
h = jpaged.start_server({tiny_text_model!r}, warmup=False, served_model_name="tiny",
                        **{TINY_SERVER_ARGS!r})
r = httpx.post(h.url + "/v1/completions", timeout=60,
               json={{"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}})
assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
h.shutdown()
print("jax imported:", "jax" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "jax imported: False" in out.stdout
