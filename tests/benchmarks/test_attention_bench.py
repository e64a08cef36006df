"""`jpaged bench attention --quick`: every point has every field, the paged kernel's output
equals the contiguous kernel's (same arithmetic, other addresses) and the dense XLA
attention's, and the GPU estimates charge the paged kernel its whole blocks and tables."""
from __future__ import annotations

import json

import pytest

from jpaged.benchmarks import attention
from jpaged.cli.main import main

POINT_KEYS = {"dtype", "block_size", "batch_size", "context_len", "kv_bytes", "paged_us",
              "contiguous_us", "dense_xla_us", "paged_over_contiguous", "paged_over_dense_xla",
              "paged_gbs", "max_abs_diff_contiguous", "max_abs_diff_dense", "roofline"}


def test_bench_attention_quick_json(tmp_path, capsys):
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--quick", "--block-sizes", "16,4", "--json",
                 "--output", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result
    q = attention.QUICK
    assert result["iters"] == q["iters"] and result["heads"] == 9 and result["kv_heads"] == 3
    assert len(result["points"]) == 2 * 2 * len(q["batch_sizes"]) * len(q["context_lens"])
    for p in result["points"]:
        assert set(p) == POINT_KEYS, set(p) ^ POINT_KEYS
        assert min(p["paged_us"], p["contiguous_us"], p["dense_xla_us"]) > 0
        assert p["paged_over_contiguous"] == pytest.approx(p["paged_us"] / p["contiguous_us"])
        assert p["max_abs_diff_contiguous"] == 0.0
        assert p["max_abs_diff_dense"] < 1e-5  # the same K/V values, float32 arithmetic
        itemsize = 4 if p["dtype"] == "float32" else 2
        assert p["kv_bytes"] == 2 * p["batch_size"] * p["context_len"] * 3 * 64 * itemsize
        for gpu in ("a100", "h100"):
            r = p["roofline"][gpu]
            assert r["paged_us"] > r["contiguous_us"] > 0  # 33 and 200 tokens end inside a block
            assert r["paged_over_contiguous"] == pytest.approx(r["paged_us"] / r["contiguous_us"])
    ratios = [p["paged_over_contiguous"] for p in result["points"]]
    assert result["paged_over_contiguous"]["min"] == min(ratios)


def test_roofline_counts_whole_blocks_and_tables():
    """64 sequences of 1024 tokens (whole 16-token blocks), bfloat16 K/V on an A100: the paged
    kernel reads the block tables on top, 4 bytes per block against 6 KiB of K/V."""
    contiguous = attention.roofline_us("a100", 64, 1024, 16, 2, paged=False)
    paged = attention.roofline_us("a100", 64, 1024, 16, 2, paged=True)
    kv = 2 * 64 * 1024 * 3 * 64 * 2
    assert contiguous == pytest.approx((kv + 2 * 64 * 9 * 64 * 2) / 2.039e12 * 1e6)
    assert paged - contiguous == pytest.approx(64 * 65 * 4 / 2.039e12 * 1e6)


def test_bench_attention_rejects_bad_sizes(capsys):
    assert main(["bench", "attention", "--batch-sizes", "0"]) == 1
    assert "--batch-sizes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="block_sizes"):
        attention.attention_benchmark(batch_sizes=(1,), context_lens=(8,), block_sizes=(24,))
