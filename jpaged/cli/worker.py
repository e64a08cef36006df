"""`jpaged worker`: one of processes 1 to N - 1 of a model split over several processes.

Start process 0 (`jpaged serve` or a script with `jpaged.LLM`) and each worker with the same
model and engine flags, `--coordinator-address HOST:PORT --num-processes N` and its own
`--process-id`: the worker loads its shards of the model, then runs each step process 0
announces until process 0 stops (exit 0). When process 0 is gone it exits non-zero saying so.
"""
from __future__ import annotations

import logging
import sys

from jpaged.arg_utils import add_engine_flags, collect


def add_arguments(parser) -> None:
    add_engine_flags(parser)


def main(args) -> int:
    from jpaged.engine.worker import run_worker
    from jpaged.exceptions import DistributedError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [worker] %(message)s")
    try:
        run_worker(args.model, **collect(args, "engine."))
    except DistributedError as e:
        print(f"jpaged worker: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
