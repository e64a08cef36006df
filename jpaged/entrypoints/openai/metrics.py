"""Prometheus metrics of a server (prometheus-client), named like vLLM's (`jpaged:` prefix).

Gauges and engine-side counters (running / waiting / swapped requests, KV cache
usage, prefix cache hit rate, generated and prompt tokens, preemptions) are read
at scrape time from the engine thread's last snapshot; latency histograms (time
to first token, time per output token, end-to-end) and request counters are
observed by the server as requests finish. Each server has its own registry, so
several can live in one process.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jpaged.engine.stats import EngineStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)


class _EngineCollector:
    """Reads the engine snapshot when Prometheus scrapes."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name, doc, value):
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), float(value))
        return g

    def _counter(self, name, doc, value):
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), float(value))
        return c

    def collect(self):
        snap = self.engine.snapshot or {}
        kv = snap.get("kv", {})
        stats = snap.get("stats") or EngineStats()
        total = kv.get("total_blocks") or 0
        yield self._gauge("jpaged:num_requests_running", "Requests with sequences in the running batch.",
                          snap.get("num_running", 0))
        yield self._gauge("jpaged:num_requests_waiting",
                          "Requests waiting to be scheduled (new or preempted).", snap.get("num_waiting", 0))
        yield self._gauge("jpaged:num_requests_swapped", "Requests swapped out to host memory.",
                          snap.get("num_swapped", 0))
        yield self._gauge("jpaged:kv_cache_usage_perc",
                          "Fraction of KV cache blocks in use (1 = full).",
                          kv.get("used_blocks", 0) / total if total else 0.0)
        yield self._gauge("jpaged:kv_cache_utilization",
                          "Tokens stored / token slots allocated in the KV blocks in use.",
                          kv.get("utilization", 0.0))
        yield self._gauge("jpaged:kv_cache_total_blocks", "KV cache blocks in the pool.", total)
        yield self._gauge("jpaged:prefix_cache_hit_rate",
                          "Fraction of prompt tokens served from the prefix cache.",
                          kv.get("prefix_cache_hit_rate", 0.0))
        yield self._counter("jpaged:num_preemptions", "Preemptions since start.",
                            kv.get("num_preemptions", 0))
        yield self._counter("jpaged:generation_tokens", "Tokens generated since start.",
                            stats.output_tokens)
        yield self._counter("jpaged:prefill_tokens",
                            "Tokens prefilled since start (recomputed ones included).",
                            stats.prefill_tokens)
        yield self._counter("jpaged:engine_steps", "Engine steps since start.", stats.steps)
        yield self._counter("jpaged:step_compilations", "Step executables compiled (or loaded from "
                            "the persistent cache) in this process.", snap.get("compilations", 0))


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram("jpaged:time_to_first_token_seconds",
                              "Time from arrival to the first output token.", labels,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.tpot = Histogram("jpaged:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", labels,
                              buckets=TPOT_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("jpaged:e2e_request_latency_seconds",
                             "Time from arrival to the last output token.", labels,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("jpaged:prompt_tokens", "Prompt tokens of finished requests.",
                                     labels, registry=r).labels(model_name)
        self.completion_tokens = Counter("jpaged:request_generation_tokens",
                                         "Output tokens delivered to clients.", labels,
                                         registry=r).labels(model_name)
        self._success = Counter("jpaged:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._success_labels = model_name
        self.aborted = Counter("jpaged:request_aborted", "Requests aborted (client went away).",
                               labels, registry=r).labels(model_name)
        self.errors = Counter("jpaged:request_errors", "Requests rejected, by HTTP status.",
                              labels + ["status"], registry=r)

    def observe_request(self, arrival: float, first: float | None, last: float,
                        num_prompt: int, num_outputs: list[int], finish_reasons) -> None:
        """One finished engine request (times from time.monotonic()); `num_outputs`: the
        token count of each of its completions."""
        longest = max(num_outputs, default=0)
        if first is not None:
            self.ttft.observe(first - arrival)
            if longest > 1:
                self.tpot.observe((last - first) / (longest - 1))
        self.e2e.observe(last - arrival)
        self.prompt_tokens.inc(num_prompt)
        self.completion_tokens.inc(sum(num_outputs))
        for reason in finish_reasons:
            self._success.labels(self._success_labels, str(reason)).inc()

    def observe_output(self, arrival: float, first: float | None, out) -> None:
        """A finished RequestOutput (EngineClient.generate_many's on_finish)."""
        comps = out.outputs
        self.observe_request(arrival, first, time.monotonic(), len(out.prompt_token_ids),
                             [len(c.token_ids) for c in comps], [c.finish_reason for c in comps])

    def error(self, status: int) -> None:
        self.errors.labels(self._success_labels, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
