"""Probes a running jpaged (or any OpenAI-compatible) server as the hostile-client issue did,
and prints what it measured as JSON lines:

- `starvation`: one request of --prompts prompts x --n samples, then (once its first token
  streams) a 1-token request; how long the small one took, against the same request alone.
- `slowloris`: --connections connections that send part of their headers and stop; the
  server process's open descriptors over --hold seconds (needs --pid, a local server).
- `probe_during_tokenize`: /health latency while a --mb MB prompt is being tokenized.

    jpaged serve --port 8000 &
    python scripts/hostile_probe.py --url http://127.0.0.1:8000 --pid $(pgrep -f "jpaged serve")
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time

import httpx


def small_request(url: str, model: str) -> float:
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", timeout=600,
                   json={"model": model, "prompt": "Hello", "max_tokens": 1})
    r.raise_for_status()
    return time.perf_counter() - start


def starvation(url: str, model: str, prompts: int, n: int) -> dict:
    alone = small_request(url, model)
    first, done = threading.Event(), {}

    def huge():
        start = time.perf_counter()
        with httpx.stream("POST", url + "/v1/completions", timeout=3600, json={
                "model": model, "prompt": [f"Item {i}: a short story" for i in range(prompts)],
                "n": n, "max_tokens": 16, "ignore_eos": True, "stream": True}) as r:
            if r.status_code != 200:
                done["error"] = f"{r.status_code} {r.read()[:200]!r}"
                first.set()
                return
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    first.set()
        done["huge_s"] = time.perf_counter() - start
    worker = threading.Thread(target=huge)
    worker.start()
    first.wait()
    behind = small_request(url, model) if "error" not in done else None
    worker.join()
    return {"probe": "starvation", "prompts": prompts, "n": n, "small_alone_s": round(alone, 3),
            "small_behind_huge_s": behind and round(behind, 3), **done}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slowloris(url: str, pid: int, connections: int, hold: float) -> dict:
    host, port = url.split("//")[1].split(":")
    socks, before = [], fd_count(pid)
    for _ in range(connections):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        socks.append(s)
    samples, start = [], time.monotonic()
    while time.monotonic() - start < hold:
        samples.append((round(time.monotonic() - start, 1), fd_count(pid)))
        time.sleep(1)
    closed = 0
    for s in socks:  # answered (a 408, or end of file) means closed by the server
        s.setblocking(False)
        try:
            s.recv(4096)
            closed += 1
        except BlockingIOError:  # nothing yet: still open
            pass
        except OSError:  # reset
            closed += 1
        s.close()
    return {"probe": "slowloris", "connections": connections, "fds_before": before,
            "fds_peak": max(f for _, f in samples), "fds_at_end": samples[-1][1],
            "closed_by_server": closed, "samples": samples[::5]}


def probe_during_tokenize(url: str, mb: int) -> dict:
    text = "lorem ipsum " * (mb * (1 << 20) // 12)
    worker = threading.Thread(target=lambda: httpx.post(url + "/tokenize", json={"prompt": text}, timeout=600))
    worker.start()
    time.sleep(0.5)  # the body is sent and being tokenized
    start = time.perf_counter()
    httpx.get(url + "/health", timeout=60)
    health = time.perf_counter() - start
    worker.join()
    return {"probe": "probe_during_tokenize", "mb": mb, "health_s": round(health, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name [default: the server's first]")
    p.add_argument("--probes", default="starvation,slowloris,probe_during_tokenize")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--pid", type=int, default=None, help="the server's process (slowloris)")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--hold", type=float, default=30.0)
    p.add_argument("--mb", type=int, default=3)
    args = p.parse_args()
    model = args.model or httpx.get(args.url + "/v1/models").json()["data"][0]["id"]
    for probe in args.probes.split(","):
        if probe == "starvation":
            out = starvation(args.url, model, args.prompts, args.n)
        elif probe == "slowloris":
            if args.pid is None:
                continue
            out = slowloris(args.url, args.pid, args.connections, args.hold)
        else:
            out = probe_during_tokenize(args.url, args.mb)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
