"""`jpaged bench throughput` in-process on the tiny text model: its JSON has every key, the
counts add up, the warm-up leaves nothing to compile, and the transformers baseline runs."""
from __future__ import annotations

import json

import pytest

from helpers import SMALL_ENGINE_FLAGS as SMALL
from jpaged.cli.main import main


def test_bench_throughput_json(tiny_text_model, tmp_path, capsys):
    import numpy as np
    rng = np.random.default_rng(0)
    workload = [{"prompt_token_ids": rng.integers(100, 49000, n).tolist(), "max_tokens": m}
                for n, m in [(5, 3), (40, 9), (17, 4), (70, 12), (9, 7), (23, 5)]]
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(workload))
    assert main(["bench", "throughput", "--workload", str(path), "--model", tiny_text_model, *SMALL,
                 "--json", "--baseline", "hf", "--hf-batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("requests", "prompt_tokens", "output_tokens", "wall_s", "output_tokens_per_s",
                "total_tokens_per_s", "kv_utilization_peak", "kv_utilization_mean",
                "preemptions", "compilations", "load_s", "warmup_s", "dtype", "model",
                "max_num_seqs", "hf_output_tokens_per_s", "speedup_vs_hf", "first_pass_s",
                "first_pass_output_tokens_per_s"):
        assert key in result, key
    assert result["requests"] == 6
    assert result["prompt_tokens"] == sum(len(r["prompt_token_ids"]) for r in workload)
    assert result["output_tokens"] == sum(r["max_tokens"] for r in workload)
    assert result["compilations"] == 0  # the warm-up compiled every shape of the timed run
    assert result["output_tokens_per_s"] == pytest.approx(result["output_tokens"] / result["wall_s"])
    assert result["total_tokens_per_s"] == pytest.approx(
        (result["output_tokens"] + result["prompt_tokens"]) / result["wall_s"])
    assert 0 < result["kv_utilization_mean"] <= result["kv_utilization_peak"] <= 1
    assert result["preemptions"] >= 0 and result["warmup_s"] > 0 and result["load_s"] > 0
    assert result["dtype"] == "float32" and result["max_num_seqs"] == 4
    # The first pass runs from process start (pytest's) to the end of the warm-up pass.
    assert result["first_pass_s"] > result["load_s"] + result["warmup_s"]
    assert result["speedup_vs_hf"] == pytest.approx(
        result["output_tokens_per_s"] / result["hf_output_tokens_per_s"])


def test_bench_throughput_under_a_baseline_policy_reports_batch_size_and_memory(
        tiny_text_model, tmp_path, capsys):
    import numpy as np
    rng = np.random.default_rng(1)
    workload = [{"prompt_token_ids": rng.integers(100, 49000, n).tolist(), "max_tokens": m}
                for n, m in [(5, 3), (40, 9), (17, 4), (9, 7)]]
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(workload))
    results = {}
    for policy in ("paged", "orca-max"):
        assert main(["bench", "throughput", "--workload", str(path), "--model", tiny_text_model,
                     *SMALL, "--json", "--kv-policy", policy]) == 0
        results[policy] = result = json.loads(capsys.readouterr().out)
        assert result["kv_policy"] == policy
        assert 1 <= result["mean_batch_size"] <= 4
        shares = result["kv_memory_shares"]
        assert set(shares) == {"token_states", "reserved", "internal_fragmentation",
                               "external_fragmentation", "free"}
        assert sum(shares.values()) == pytest.approx(1.0)
    # orca-max reserves 128 tokens (max_model_len) per request: 8 blocks where paged takes 1-4
    assert results["orca-max"]["kv_memory_shares"]["internal_fragmentation"] > \
        4 * results["paged"]["kv_memory_shares"]["internal_fragmentation"]
    assert results["orca-max"]["kv_utilization_mean"] < results["paged"]["kv_utilization_mean"]
