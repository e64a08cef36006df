"""Online serving benchmark: Poisson arrivals from a workload file against a running server.

Each request of the workload (`{"prompt_token_ids": [...], "max_tokens": N}`) is sent
to POST /v1/completions as token ids, streaming, with `ignore_eos` (so it generates
exactly N tokens), at arrival times drawn from a Poisson process of the given rate
(`inf`: all at once). Reports request throughput, output tokens/s, and mean / median /
p99 of time to first token (TTFT), time per output token after the first (TPOT),
inter-token latency between streamed chunks (ITL), end-to-end latency and normalized
latency (end-to-end latency / output tokens, the vLLM paper's metric). A sweep over
rates gives the throughput-latency curve, plotted as a PNG (matplotlib).

Warm-up (`full`, the default) first sends the workload all at once, untimed, so the
server compiles its step shapes; every run then moves the prompts' token ids by its
own offset (same lengths), so no run is served from the prefix cache another filled.
Against a jpaged server the results also count the step compilations and preemptions
during each run: compilations > 0 means compile time is inside the latencies.

`jpaged bench serving` and `scripts/benchmark_serving.py` both run `main`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from typing import Any

import numpy as np

from .workloads import load_workload, log, random_workload, vary


async def _one(client, body: dict, headers: dict, start_at: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    sent = time.perf_counter()
    rec: dict[str, Any] = {"ok": False, "ttft": None, "itl": [], "output_tokens": 0, "error": None}
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    rec["error"] = data["error"].get("message")
                    return rec
                if data.get("usage"):
                    rec["output_tokens"] = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        rec["ttft"] = now - sent
                    else:
                        rec["itl"].append(now - last)
                    last = now
        rec["e2e"] = time.perf_counter() - sent
        rec["ok"] = rec["ttft"] is not None and rec["output_tokens"] > 0
        if not rec["ok"]:
            rec["error"] = "no output"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        rec["error"] = repr(e)[:200]
    return rec


async def _scrape(client) -> dict[str, float]:
    """The server's jpaged counters (empty for another server)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
        r = await client.get("/metrics")
        return {s.name: s.value for fam in text_string_to_metric_families(r.text)
                for s in fam.samples if s.name.startswith("jpaged:") and "le" not in s.labels}
    except Exception:  # noqa: BLE001 - metrics are a bonus
        return {}


async def _served_model(client, headers) -> str:
    r = await client.get("/v1/models", headers=headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_benchmark(url: str, workload: list[dict], request_rate: float = math.inf, *,
                        model: str | None = None, api_key: str | None = None,
                        temperature: float = 0.0, seed: int = 0, timeout: float = 3600.0,
                        variant: int = 0) -> dict[str, Any]:
    """Replay `workload` against the server at `url` with Poisson arrivals of rate
    `request_rate` (requests/s); returns the summary (see `summarize`). `variant` k > 0
    moves every prompt token id by k (same lengths, prompts no earlier run cached)."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(workload) + 4, max_keepalive_connections=len(workload))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        model = model or await _served_model(client, headers)
        rng = np.random.default_rng(seed)
        gaps = rng.exponential(1.0 / request_rate, len(workload)) if math.isfinite(request_rate) \
            else np.zeros(len(workload))
        gaps[0] = 0.0
        start = time.perf_counter() + 0.05
        arrivals = start + np.cumsum(gaps)
        bodies = [{"model": model, "prompt": vary(r["prompt_token_ids"], variant),
                   "max_tokens": r["max_tokens"], "ignore_eos": True, "temperature": temperature,
                   "seed": seed + i, "stream": True, "stream_options": {"include_usage": True}}
                  for i, r in enumerate(workload)]
        before = await _scrape(client)
        recs = await asyncio.gather(*(_one(client, b, headers, t) for b, t in zip(bodies, arrivals)))
        duration = time.perf_counter() - start
        after = await _scrape(client)
    res = summarize(recs, duration, request_rate, workload)
    for key, name in (("compilations", "jpaged:step_compilations_total"),
                      ("preemptions", "jpaged:num_preemptions_total")):
        if name in after:
            res[key] = int(after[name] - before.get(name, 0))
    return res


def _stats(values, scale: float = 1.0) -> dict[str, float]:
    if not len(values):
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values, dtype=np.float64) * scale
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def summarize(recs: list[dict], duration: float, request_rate: float, workload) -> dict[str, Any]:
    ok = [r for r in recs if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(len(w["prompt_token_ids"]) for w, r in zip(workload, recs) if r["ok"])
    tpot = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    return {
        "request_rate": request_rate if math.isfinite(request_rate) else "inf",
        "num_requests": len(recs), "completed": len(ok), "failed": len(recs) - len(ok),
        "errors": sorted({r["error"] for r in recs if r["error"]})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + in_tokens) / duration,
        "output_tokens": out_tokens, "prompt_tokens": in_tokens,
        "ttft_ms": _stats([r["ttft"] for r in ok], 1e3),
        "tpot_ms": _stats(tpot, 1e3),
        "itl_ms": _stats([x for r in ok for x in r["itl"]], 1e3),
        "e2e_s": _stats([r["e2e"] for r in ok]),
        "normalized_latency_s_per_token": _stats([r["e2e"] / r["output_tokens"] for r in ok]),
    }


def format_serving(res: dict) -> str:
    lines = [f"request rate {res['request_rate']} req/s: {res['completed']}/{res['num_requests']} "
             f"completed in {res['duration_s']:.1f} s",
             f"  throughput: {res['request_throughput']:.3f} req/s, "
             f"{res['output_tokens_per_s']:.1f} output tokens/s, "
             f"{res['total_tokens_per_s']:.1f} total tokens/s"]
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2e_s", "E2E latency (s)"),
                       ("normalized_latency_s_per_token", "normalized latency (s/token)")):
        s = res[key]
        lines.append(f"  {label:30s} mean {s['mean']:9.3f}  median {s['median']:9.3f}  p99 {s['p99']:9.3f}")
    if "compilations" in res:
        lines.append(f"  server: {res['compilations']} step compilations, "
                     f"{res['preemptions']} preemptions during the run")
    if res["errors"]:
        lines.append(f"  errors: {res['errors']}")
    return "\n".join(lines)


def plot_sweep(results: list[dict], path: str, title: str = "") -> None:
    """Normalized latency and throughput against request rate (the paper's figure 12 shape)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = [r for r in results if r["request_rate"] != "inf"]
    rates = [r["request_rate"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("mean", "o-"), ("median", "s--"), ("p99", "^:")):
        ax1.plot(rates, [r["normalized_latency_s_per_token"][key] for r in results], style, label=key)
    ax1.set(xlabel="request rate (req/s)", ylabel="normalized latency (s/token)",
            title="latency vs load")
    ax1.legend()
    ax2.plot(rates, [r["output_tokens_per_s"] for r in results], "o-", label="output tokens/s")
    ax2.plot(rates, [r["request_throughput"] * 100 for r in results], "s--", label="requests/s x100")
    ax2.set(xlabel="request rate (req/s)", ylabel="throughput", title="throughput vs load")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def benchmark_serving(url: str, workload_path: str, rates: list[float], *, num_requests=None,
                      warmup: bool = True, repeat: int = 1, input_len: int = 128,
                      output_len: int = 32, quiet: bool = False, **kw) -> list[dict]:
    """One result per rate; with `repeat` > 1 each rate runs that many times (each with its
    own prompts) and the result holds the median of every figure, the runs in `runs`."""
    if workload_path == "random":
        workload = random_workload(num_requests or 32, input_len, output_len, kw.get("seed", 0))
    else:
        workload = load_workload(workload_path, num_requests)
    if warmup:  # the same lengths with other token ids: a server that compiles on first use does
        log(f"warm-up: {len(workload)} requests at once (untimed) ...", quiet)
        asyncio.run(run_benchmark(url, workload, math.inf, variant=1, **kw))
    results, variant = [], 2
    for rate in rates:  # each run its own prompts: none served from another's cache
        runs = []
        for _ in range(repeat):
            runs.append(asyncio.run(run_benchmark(url, workload, rate, variant=variant, **kw)))
            variant += 1
        res = median_result(runs)
        res["workload"] = os.path.basename(str(workload_path))
        log(format_serving(res), quiet)
        results.append(res)
    return results


def median_result(runs: list[dict]) -> dict:
    """The median over runs of every number (nested stats too); the runs kept in `runs`."""
    if len(runs) == 1:
        return dict(runs[0])

    def merge(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values]) for k in first}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return float(np.median(values))
        return first
    out = merge(runs)
    out["errors"] = sorted({e for r in runs for e in r["errors"]})[:5]
    out["runs"] = runs
    return out


def _rate(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "infinity") else float(text)


DESCRIPTION = __doc__


def add_cli_args(parser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="a running jpaged (or any OpenAI-compatible) server [default: %(default)s]")
    parser.add_argument("--workload", required=True, metavar="NAME|FILE.json",
                        help="'random' (vLLM's random dataset: --random-input-len prompt tokens, "
                             "--random-output-len output tokens), a shipped workload "
                             "(sharegpt_short_64, sharegpt_256, alpaca_256) or a JSON list of "
                             '{"prompt_token_ids": [...], "max_tokens": N}')
    parser.add_argument("--num-requests", type=int, default=None, metavar="K",
                        help="use only the first K requests (random: make K) [random: 32]")
    parser.add_argument("--random-input-len", type=int, default=128, metavar="N",
                        help="random workload: prompt tokens [default: 128]")
    parser.add_argument("--random-output-len", type=int, default=32, metavar="N",
                        help="random workload: output tokens [default: 32]")
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="runs per rate, each with its own prompts; the median is reported "
                             "[default: 1]")
    parser.add_argument("--request-rate", type=_rate, default=math.inf, metavar="R",
                        help="mean arrivals per second, Poisson; inf = all at once [default: inf]")
    parser.add_argument("--sweep", default=None, metavar="R1,R2,...",
                        help="run once per rate (overrides --request-rate)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="plot latency and throughput against rate (needs matplotlib)")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="write the results here")
    parser.add_argument("--model", default=None, help="model name to send [default: the server's first]")
    parser.add_argument("--api-key", default=os.environ.get("JPAGED_API_KEY"),
                        help="[default: $JPAGED_API_KEY]")
    parser.add_argument("--temperature", type=float, default=0.0, help="[default: 0, greedy]")
    parser.add_argument("--seed", type=int, default=0, help="arrival times and request seeds")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="send the workload once first, all at once and untimed, with other "
                             "token ids, so that nothing compiles in the timed runs on a server "
                             "that compiles on first use (see 'compilations' in the results) "
                             "[default: on]")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def main(args) -> int:
    rates = [_rate(r) for r in args.sweep.split(",")] if args.sweep else [args.request_rate]
    results = benchmark_serving(args.url, args.workload, rates, num_requests=args.num_requests,
                                warmup=args.warmup, repeat=args.repeat,
                                input_len=args.random_input_len, output_len=args.random_output_len,
                                quiet=args.quiet or args.json, model=args.model,
                                api_key=args.api_key, temperature=args.temperature, seed=args.seed)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot_sweep(results, args.plot, title=os.path.basename(str(args.workload)))
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.quiet:
        print("\n".join(format_serving(r) for r in results))
    return 0 if all(r["failed"] == 0 for r in results) else 1
