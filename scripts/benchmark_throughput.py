#!/usr/bin/env python3
"""Offline throughput benchmark: `jpaged bench throughput` as a script.

    python scripts/benchmark_throughput.py --workload sharegpt_short_64 --json --baseline hf

All measuring happens in `jpaged.benchmarks.throughput`, the code `jpaged bench throughput` runs.
"""
import sys

from jpaged.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))
