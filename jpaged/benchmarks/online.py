"""Online latency in one process: a workload arrives on a Poisson clock into an engine that
steps while anything is unfinished (the vLLM paper's Figs. 12-13 and 18-19 setting, without
a server in between, so that runs differ only in the engine's arguments).

Request i arrives at the i-th time of a Poisson process of `rate` requests/s (seeded); it is
added to the engine at the first step boundary after that time, and its latency runs from
the arrival (so waiting for the running step counts, as it would for a server). Every
request generates exactly its `max_tokens` (`ignore_eos`, greedy). Normalized latency is the
paper's metric: a request's end-to-end latency divided by its output tokens, averaged over
the requests. The engine should be warmed up (`LLM.warmup`) first; `shift` moves every
prompt token id (`workloads.vary`) so that no run meets the prefix cache another filled.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .workloads import vary


def arrival_times(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Seconds from the start at which each of `n` requests arrives (`inf`: all at 0)."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    gaps[0] = 0.0  # the first request opens the run
    return np.cumsum(gaps)


def replay(llm, workload: list[dict[str, Any]], rate: float, *, seed: int = 0,
           shift: int = 0) -> dict[str, Any]:
    """Replay `workload` at `rate` requests/s into `llm` (an `LLM` / `EngineCore`); return
    normalized latency (mean, median, p90), request and token throughput, mean batch size,
    KV utilization and memory shares, preemptions and step compilations during the run."""
    from jpaged.sampling_params import SamplingParams
    arrivals = arrival_times(len(workload), rate, seed)
    prompts = [{"prompt_token_ids": vary(r["prompt_token_ids"], shift) if shift else r["prompt_token_ids"]}
               for r in workload]
    params = [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0)
              for r in workload]
    llm.stats.record_memory = True
    llm.stats.reset()
    preemptions, compilations = llm.scheduler.num_preemptions, llm.num_compilations()
    ids: dict[str, int] = {}
    finished: dict[int, float] = {}
    added = 0
    start = time.perf_counter()
    while len(finished) < len(workload):
        now = time.perf_counter() - start
        while added < len(workload) and arrivals[added] <= now:
            ids[llm.add_request(prompts[added], params[added], request_id=f"online-{shift}-{added}")] = added
            added += 1
        if not llm.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[added] - now))
            continue
        for out in llm.step():
            if out.finished:
                finished[ids[out.request_id]] = time.perf_counter() - start
    duration = time.perf_counter() - start
    outputs = np.array([r["max_tokens"] for r in workload], dtype=float)
    latency = np.array([finished[i] - arrivals[i] for i in range(len(workload))])
    normalized = latency / outputs
    kv = llm.kv_cache_stats()
    return {
        "request_rate": rate, "requests": len(workload), "duration_s": duration,
        "requests_per_s": len(workload) / duration,
        "output_tokens_per_s": outputs.sum() / duration,
        "normalized_latency_mean_s": float(normalized.mean()),
        "normalized_latency_median_s": float(np.median(normalized)),
        "normalized_latency_p90_s": float(np.percentile(normalized, 90)),
        "latency_mean_s": float(latency.mean()),
        "mean_batch_size": llm.stats.mean_batch_size,
        "kv_utilization_mean": llm.stats.kv_utilization_mean,
        "kv_memory_shares": llm.stats.memory_shares(),
        "steps": llm.stats.steps,
        "preemptions": llm.scheduler.num_preemptions - preemptions,
        "compilations": llm.num_compilations() - compilations,
        "kv_policy": llm.config.kv_policy, "block_size": llm.config.block_size,
        "preemption_mode": llm.config.preemption_mode, "kv_total_blocks": kv["total_blocks"],
    }


def sustained_rate(points: list[dict[str, Any]], bound_s: float) -> float:
    """The highest request rate whose mean normalized latency stays within `bound_s`,
    interpolated linearly between the measured rates (sorted); 0 if even the lowest
    exceeds it, the highest measured rate if none does."""
    pts = sorted((p["request_rate"], p["normalized_latency_mean_s"]) for p in points
                 if not math.isinf(p["request_rate"]))
    if not pts or pts[0][1] > bound_s:
        return 0.0
    for (r0, l0), (r1, l1) in zip(pts, pts[1:]):
        if l1 > bound_s:
            return r0 + (r1 - r0) * (bound_s - l0) / (l1 - l0)
    return pts[-1][0]
