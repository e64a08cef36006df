"""`jpaged bench weights` on the tiny model: every measurement is there, the in-place swap
compiles nothing, and sleep frees at least the pool and the weights."""
from __future__ import annotations

from helpers import TINY_SERVER_ARGS

from jpaged.benchmarks import weights


def test_bench_weights_quick(tiny_text_model):
    # no compilation cache: an in-memory engine (the rebuild) would turn XLA's on process-wide
    r = weights.weights_benchmark(tiny_text_model, repeats=1, quiet=True, compilation_cache_dir="",
                                  **TINY_SERVER_ARGS)
    assert r["in_place"]["compilations"] == 0
    assert r["sleep"]["level1_freed_bytes"] >= r["pool_bytes"] + r["weight_bytes"]
    assert r["sleep"]["level2_freed_bytes"] >= r["pool_bytes"] + r["weight_bytes"]
    for way in ("in_place", "rebuild", "reload"):
        assert r["ready_s"][way] > 0
    table = weights.format_table(r)
    assert "update_weights" in table and "sleep(level=2)" in table
