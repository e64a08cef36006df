"""Benchmarks, the same code `jpaged bench ...` and `scripts/benchmark_*.py` run: offline
throughput (with a transformers baseline), online serving against a running server, memory
saved by sharing; and the workloads they replay (`workloads.py`, shipped in `data/`)."""
