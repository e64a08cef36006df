#!/usr/bin/env python3
"""Memory-sharing benchmark: `jpaged bench memory` as a script.

    python scripts/benchmark_memory.py --num-requests 16 --max-tokens 128 --plot docs/memory_sharing.png

All measuring happens in `jpaged.bench_memory`, the code `jpaged bench memory` runs.
"""
import argparse
import sys

from jpaged.bench_memory import BENCH_MEMORY_DESCRIPTION, add_bench_memory_arguments, cmd_bench_memory
from jpaged.cli import _add_engine_flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=BENCH_MEMORY_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_memory_arguments(parser)
    _add_engine_flags(parser)
    return cmd_bench_memory(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
