"""`jpaged bench serving` against the shared tiny server, briefly: every request completes
with exactly its tokens, the latency statistics are filled, and the plot is drawn."""
from __future__ import annotations

import json

import pytest


def test_bench_serving_runs(tiny_server, tmp_path):
    from jpaged.benchmarks.serving import benchmark_serving, format_serving, plot_sweep
    workload = [{"prompt_token_ids": [100 + 7 * i + j for j in range(5 + 3 * i)], "max_tokens": 3 + i}
                for i in range(4)]
    path = tmp_path / "w.json"
    path.write_text(json.dumps(workload))
    results = benchmark_serving(tiny_server.url, str(path), [float("inf"), 20.0], warmup="none",
                                quiet=True)
    for res in results:
        assert res["completed"] == 4 and res["failed"] == 0 and res["output_tokens"] == 3 + 4 + 5 + 6
        assert res["ttft_ms"]["mean"] > 0 and res["normalized_latency_s_per_token"]["p99"] > 0
        assert res["compilations"] >= 0 and "TTFT" in format_serving(res)
    pytest.importorskip("matplotlib")
    plot_sweep(results, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000
