#!/usr/bin/env python3
"""Memory-sharing benchmark: `jpaged bench memory` as a script.

    python scripts/benchmark_memory.py --num-requests 16 --max-tokens 128 --plot docs/memory_sharing.png

All measuring happens in `jpaged.benchmarks.memory`, the code `jpaged bench memory` runs.
"""
import sys

from jpaged.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "memory", *sys.argv[1:]]))
