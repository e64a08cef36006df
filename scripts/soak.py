#!/usr/bin/env python3
"""Soak test of a jpaged server: many mixed requests, some aborted mid-stream.

Sends `--num-requests` requests (default 1,000) with at most `--concurrency` in
flight: completions and chat completions, streaming and not, n = 1 or 2, random
`max_tokens` with `ignore_eos`, so every completion must have exactly that many
tokens. About `--abort-fraction` of the streaming ones are dropped by the client
after a few chunks. Then it checks that no request was lost (each finished
request came back whole), none was duplicated (no response id or finish seen
twice, no extra tokens) and, once the server is idle, that /metrics shows no
running or waiting request and no KV block in use.

    python scripts/soak.py --url http://127.0.0.1:8000      # a running server
    python scripts/soak.py --model PATH --max-model-len 512  # starts one in-process

Exit status 0 when everything checks out. `run_soak` is what the test suite calls
(with 100 requests).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx

from jpaged.arg_utils import add_engine_flags, collect


def _metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if "le" not in s.labels and "finished_reason" not in s.labels:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _plan(i: int, rng: random.Random, max_tokens: int, abort_fraction: float) -> dict:
    stream = rng.random() < 0.7
    return {"i": i, "chat": rng.random() < 0.5, "stream": stream,
            "n": 2 if rng.random() < 0.15 else 1, "max_tokens": rng.randint(1, max_tokens),
            "abort_after": rng.randint(1, 3) if stream and rng.random() < abort_fraction / 0.7 else 0,
            "words": rng.randint(1, 12)}


def _body(p: dict, model: str | None) -> dict:
    body = {"max_tokens": max(p["max_tokens"], 8 if p["abort_after"] else 1), "n": p["n"],
            "temperature": 0.0 if p["n"] == 1 else 0.8, "seed": p["i"], "ignore_eos": True,
            "stream": p["stream"]}
    if model:
        body["model"] = model
    text = f"soak request {p['i']}: " + " ".join(["token"] * p["words"])
    if p["chat"]:
        body.update(messages=[{"role": "user", "content": text}], logprobs=True)
    else:
        body.update(prompt=text, logprobs=0)
    if p["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


def _count(choice: dict, chat: bool) -> int:
    lp = choice.get("logprobs")
    if not lp:
        return 0
    return len(lp.get("content") or []) if chat else len(lp.get("tokens") or [])


async def _one(client: httpx.AsyncClient, p: dict, model, headers, result: dict) -> None:
    body = _body(p, model)
    path = "/v1/chat/completions" if p["chat"] else "/v1/completions"
    want = body["max_tokens"]
    tokens = {j: 0 for j in range(p["n"])}
    finishes: dict[int, int] = {j: 0 for j in range(p["n"])}
    ids = set()
    if not p["stream"]:
        r = await client.post(path, json=body, headers=headers)
        r.raise_for_status()
        data = r.json()
        ids.add(data["id"])
        for ch in data["choices"]:
            tokens[ch["index"]] += _count(ch, p["chat"])
            finishes[ch["index"]] += ch["finish_reason"] is not None
        usage = data["usage"]["completion_tokens"]
        done = 1
    else:
        usage, done, chunks = None, 0, 0
        async with client.stream("POST", path, json=body, headers=headers) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done += 1
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(data["error"]["message"])
                ids.add(data["id"])
                if data.get("usage"):
                    usage = data["usage"]["completion_tokens"]
                for ch in data["choices"]:
                    tokens[ch["index"]] += _count(ch, p["chat"])
                    finishes[ch["index"]] += ch.get("finish_reason") is not None
                chunks += 1
                if p["abort_after"] and chunks >= p["abort_after"] and not any(finishes.values()):
                    result["aborted"] += 1
                    return  # leaving `stream` closes the connection mid-stream
    result["ids"].extend(ids)
    if len(ids) != 1 or done != 1 or any(f > 1 for f in finishes.values()) or \
            any(t > want for t in tokens.values()):
        result["duplicated"] += 1
    elif any(t != want for t in tokens.values()) or any(f != 1 for f in finishes.values()) or \
            usage != want * p["n"]:
        result["wrong"] += 1
        result["examples"].append({"plan": p, "tokens": tokens, "usage": usage})
    else:
        result["completed"] += 1


async def run_soak(url: str, num_requests: int = 1000, concurrency: int = 32,
                   abort_fraction: float = 0.1, max_tokens: int = 64, seed: int = 0,
                   model: str | None = None, api_key: str | None = None,
                   idle_timeout: float = 60.0, timeout: float = 600.0) -> dict:
    """Run the soak against `url`; returns counts (completed, aborted, lost, duplicated,
    wrong), the engine's state after it went idle and `ok`."""
    rng = random.Random(seed)
    plans = [_plan(i, rng, max_tokens, abort_fraction) for i in range(num_requests)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = {"completed": 0, "aborted": 0, "lost": 0, "duplicated": 0, "wrong": 0, "ids": [],
              "examples": [], "errors": []}
    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def guarded(p):
            async with sem:
                try:
                    await _one(client, p, model, headers, result)
                except Exception as e:  # noqa: BLE001 - counted, not raised
                    result["lost"] += 1
                    result["errors"].append(f"request {p['i']}: {e!r}"[:300])
        await asyncio.gather(*(guarded(p) for p in plans))
        wall = time.perf_counter() - start
        deadline = time.monotonic() + idle_timeout
        while True:  # aborts are processed between steps: wait for the engine to go idle
            m = _metrics((await client.get("/metrics")).text)
            busy = m.get("jpaged:num_requests_running", 0) + m.get("jpaged:num_requests_waiting", 0)
            if (busy == 0 and m.get("jpaged:kv_cache_usage_perc", 0) == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    ids = result.pop("ids")
    result["duplicated"] += len(ids) - len(set(ids))
    result.update(
        requests=num_requests, wall_s=round(wall, 2),
        running_after=m.get("jpaged:num_requests_running"),
        waiting_after=m.get("jpaged:num_requests_waiting"),
        kv_usage_after=m.get("jpaged:kv_cache_usage_perc"),
        leaked_blocks=round(m.get("jpaged:kv_cache_usage_perc", 0)
                            * m.get("jpaged:kv_cache_total_blocks", 0)),
        preemptions=m.get("jpaged:num_preemptions_total"))
    result["ok"] = (result["lost"] == 0 and result["duplicated"] == 0 and result["wrong"] == 0
                    and result["completed"] + result["aborted"] == num_requests
                    and busy == 0 and result["leaked_blocks"] == 0)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server; none = start one in-process")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--abort-fraction", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--served-model-name", default=None, help="'model' field to send")
    parser.add_argument("--api-key", default=None)
    add_engine_flags(parser)
    args = parser.parse_args(argv)
    handle = None
    url = args.url
    if url is None:
        from jpaged import start_server
        engine_args = collect(args, "engine.", {"max_num_seqs": 32, "max_model_len": 512,
                                                "kv_cache_memory": 64 << 20})
        print("starting a server ...", file=sys.stderr, flush=True)
        handle = start_server(args.model, api_key=args.api_key, **engine_args)
        url = handle.url
    try:
        report = asyncio.run(run_soak(url, args.num_requests, args.concurrency, args.abort_fraction,
                                      args.max_tokens, args.seed, args.served_model_name, args.api_key))
    finally:
        if handle is not None:
            handle.shutdown()
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
