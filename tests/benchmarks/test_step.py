"""`jpaged bench step` on the tiny text model: one row per batch size, the live K/V it
counts is what the pool holds for those sequences, and the floors are the larger of bytes
and FLOPs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jpaged.cli.main import main


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_bench_step_json(tiny_text_model, capsys, dtype):
    assert main(["bench", "step", "--model", tiny_text_model, "--batch-sizes", "1,3",
                 "--context", "40", "--iters", "2", "--json", "--dtype", dtype,
                 "--max-num-seqs", "4", "--max-model-len", "128", "--kv-cache-memory", "8000000",
                 "--compilation-cache-dir", ""]) == 0
    result = json.loads(capsys.readouterr().out)
    with open(f"{tiny_text_model}/config.json") as f:
        cfg = json.load(f)
    itemsize = np.dtype(np.float32).itemsize if dtype == "float32" else 2
    assert result["dtype"] == dtype and result["kv_cache_dtype"] == dtype
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * itemsize
    assert [r["batch_size"] for r in result["rows"]] == [1, 3]
    for r in result["rows"]:
        assert r["padded_rows"] >= r["batch_size"] and r["step_ms"] > 0
        assert r["kv_bytes"] == r["batch_size"] * 40 * per_token
        assert r["floor_ms"] == pytest.approx(max(r["bytes_floor_ms"], r["flop_floor_ms"]))
        assert r["step_over_floor"] == pytest.approx(r["step_ms"] / r["floor_ms"])


def test_bench_step_rejects_bad_batch_sizes(tiny_text_model, capsys):
    assert main(["bench", "step", "--model", tiny_text_model, "--batch-sizes", "0"]) == 1
    assert "--batch-sizes" in capsys.readouterr().err
