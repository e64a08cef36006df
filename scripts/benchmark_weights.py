#!/usr/bin/env python3
"""Weight-swap benchmark: `jpaged bench weights` as a script.

    python scripts/benchmark_weights.py --repeats 3 --json /tmp/weights.json

All measuring happens in `jpaged.benchmarks.weights`, the code `jpaged bench weights` runs.
"""
import sys

from jpaged.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "weights", *sys.argv[1:]]))
