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
    results = benchmark_serving(tiny_server.url, str(path), [float("inf"), 20.0], warmup=False,
                                quiet=True)
    for res in results:
        assert res["completed"] == 4 and res["failed"] == 0 and res["output_tokens"] == 3 + 4 + 5 + 6
        assert res["ttft_ms"]["mean"] > 0 and res["normalized_latency_s_per_token"]["p99"] > 0
        assert res["compilations"] >= 0 and "TTFT" in format_serving(res)
    pytest.importorskip("matplotlib")
    plot_sweep(results, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_bench_serving_random_dataset_median_of_repeats(tiny_server, capsys):
    """`--workload random` makes vLLM's random dataset (fixed prompt and output lengths);
    `--repeat 3` runs each rate three times and reports the median of every figure."""
    import numpy as np

    from jpaged.cli.main import main
    assert main(["bench", "serving", "--url", tiny_server.url, "--workload", "random",
                 "--num-requests", "4", "--random-input-len", "9", "--random-output-len", "3",
                 "--sweep", "inf,30", "--repeat", "3", "--no-warmup", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["request_rate"] for r in results] == ["inf", 30.0]
    for res in results:
        assert len(res["runs"]) == 3
        for run in res["runs"]:
            assert run["completed"] == 4 and run["output_tokens"] == 12 and run["prompt_tokens"] == 36
        for key in ("output_tokens_per_s", "duration_s"):
            assert res[key] == np.median([run[key] for run in res["runs"]])
        assert res["ttft_ms"]["p99"] == np.median([run["ttft_ms"]["p99"] for run in res["runs"]])
