#!/usr/bin/env python3
"""Serving benchmark against a running server (the same code as `jpaged bench serving`).

    python -m jpaged.server --max-num-seqs 32 &          # or: jpaged serve ...
    python scripts/benchmark_serving.py --workload /path/sharegpt_short_64.json \\
        --sweep 0.25,0.5,1,2 --plot serving.png --output serving.json

See jpaged/bench_serving.py for what is measured.
"""
import argparse
import sys

from jpaged.bench_serving import add_bench_serving_arguments, cmd_bench_serving

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_serving_arguments(parser)
    sys.exit(cmd_bench_serving(parser.parse_args()))
