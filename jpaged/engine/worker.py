"""A worker process of a model split over several processes (`jpaged worker`,
`jpaged.run_worker`): process 0 is the engine; this process loads the same model into
its devices' shards, then runs each step and block copy process 0 announces
(`jpaged.runner.distributed.follow`) until process 0 stops.
"""
from __future__ import annotations

import logging

from jpaged.config import EngineConfig
from jpaged.runner import distributed

from .engine_core import build_runner, process_identity

log = logging.getLogger(__name__)


class _NoTokenizer:
    """A worker neither tokenizes nor samples: it needs no tokenizer files, and a GGUF's
    vocabulary is not converted for it."""
    eos_token_id = None


def run_worker(model=None, *, params=None, tokenizer=None, **engine_args) -> int:
    """Follow process 0 until it stops; returns the steps run. `model`, `params` and the
    engine arguments are process 0's (its `process_id` aside; no tokenizer is needed); raises
    `DistributedError` when process 0 is gone or runs other arguments."""
    config = EngineConfig(**engine_args)
    if config.num_processes < 2 or config.process_id == 0:
        raise ValueError(f"a worker is process 1 to num_processes - 1 of a model split over "
                         f"several processes; got process_id={config.process_id} of "
                         f"num_processes={config.num_processes} (process 0 is the engine: "
                         "jpaged.LLM or jpaged serve)")
    distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    loaded, kv, runner = build_runner(config, model, params, tokenizer or _NoTokenizer())
    distributed.agree(process_identity(config, loaded, kv))
    log.info("worker %d of %d ready: following process 0", config.process_id, config.num_processes)
    steps = distributed.follow(runner)
    log.info("process 0 stopped after %d steps", steps)
    return steps
