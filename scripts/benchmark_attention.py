#!/usr/bin/env python3
"""Paged against contiguous decode attention (the paper's Fig. 18a): `jpaged bench attention`
as a script.

    python scripts/benchmark_attention.py --output attention.json
    python scripts/benchmark_attention.py --quick --json

All measuring happens in `jpaged.benchmarks.attention`, the code `jpaged bench attention` runs.
"""
import sys

from jpaged.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
