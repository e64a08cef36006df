#!/usr/bin/env python3
"""Serving benchmark against a running server (`jpaged serve`): `jpaged bench serving` as a script.

    python scripts/benchmark_serving.py --workload sharegpt_short_64 --sweep 0.25,0.5,1,2 --plot serving.png

All measuring happens in `jpaged.benchmarks.serving`, the code `jpaged bench serving` runs.
"""
import sys

from jpaged.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "serving", *sys.argv[1:]]))
