"""`jpaged bench weights`: new weights into a serving engine, three ways, and sleep / wake.

For a research pipeline that samples between training steps, what counts is the time from
"new weights are ready" to "the engine generates with them". Measured on one engine, in
one process, with the model's own weights as the "new" ones (the same shapes and dtypes):

- **in place**: `LLM.update_weights(params)`, then the first token of a short greedy
  request (`first_token_s`: nothing recompiles);
- **rebuild**: a new `LLM(model=<Flax module>, params=..., tokenizer=...)` from the same
  in-memory tree (what a pipeline without update_weights does), then its first token
  (its steps compile, or come from XLA's persistent cache);
- **reload**: a new `LLM(<path>)` reading the weights from disk, then its first token;
- **sleep / wake**: `sleep(level=1)` (the pool deleted, the weights copied to host memory)
  and `wake_up()`; `sleep(level=2)` and `wake_up()` followed by `update_weights`; with
  the device bytes freed.

Each is repeated `--repeats` times (the median is reported); the old engine is deleted
before a new one is built.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from typing import Any

import jax

from jpaged.arg_utils import add_engine_flags, collect
from jpaged.sampling_params import SamplingParams

from .workloads import log

PROBE = SamplingParams(temperature=0, max_tokens=1)
PROBE_PROMPT = "The capital of France is"


def _sleep_cycle(llm, level: int, weights) -> tuple[float, float, int]:
    """One sleep(level) + wake_up (+ update_weights after level 2): seconds asleep-going,
    seconds waking, device bytes freed."""
    before = _live_bytes()
    t = time.perf_counter()
    llm.sleep(level=level)
    sleep_s = time.perf_counter() - t
    freed = before - _live_bytes()
    t = time.perf_counter()
    llm.wake_up()
    if level == 2:
        llm.update_weights(weights)
    jax.block_until_ready((llm.runner.params, llm.runner.kv_pool))
    return sleep_s, time.perf_counter() - t, freed


def _build_repeatedly(build, repeats: int) -> dict[str, float]:
    """Median seconds to build a new engine, and from there to its first token."""
    build_s, first_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        llm = build()
        build_s.append(time.perf_counter() - t)
        first_s.append(_first_token_s(llm))
        del llm
        gc.collect()
    return {"build_s": _median(build_s), "first_token_s": _median(first_s)}


def _first_token_s(llm) -> float:
    start = time.perf_counter()
    llm.generate([PROBE_PROMPT], PROBE, use_tqdm=False)
    return time.perf_counter() - start


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def weights_benchmark(model=None, *, repeats: int = 3, quiet: bool = False,
                      **engine_args) -> dict[str, Any]:
    from jpaged import LLM
    from jpaged.models import model_class

    def say(msg):
        log(msg, quiet)
    start = time.perf_counter()
    llm = LLM(model, **engine_args)
    load_s = time.perf_counter() - start
    _first_token_s(llm)  # compile what the probe needs
    say(f"loaded in {load_s:.1f} s")
    weights = llm.get_weights()
    result: dict[str, Any] = {
        "model": llm.model_path, "dtype": str(jax.tree_util.tree_leaves(weights)[0].dtype),
        "weight_bytes": llm.weights.num_bytes, "pool_bytes": llm.runner.pool_bytes,
        "packed_weights": llm.weights.packed, "repeats": repeats}

    get_s, update_s, update_first_s = [], [], []
    compiles = llm.num_compilations()
    for _ in range(repeats + 1):
        t = time.perf_counter()
        weights = llm.get_weights()
        jax.block_until_ready(weights)
        get_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        llm.update_weights(weights)
        jax.block_until_ready(llm.runner.params)
        update_s.append(time.perf_counter() - t)
        update_first_s.append(_first_token_s(llm))
    # the first call also compiles the conversion into the runner's layout (not a step)
    result["in_place"] = {"get_weights_s": _median(get_s[1:] or get_s),
                          "update_weights_s": _median(update_s[1:] or update_s),
                          "first_update_weights_s": update_s[0],
                          "first_token_s": _median(update_first_s),
                          "compilations": llm.num_compilations() - compiles}
    say(f"in place: update {result['in_place']['update_weights_s']:.3f} s")

    cycles = {level: [_sleep_cycle(llm, level, weights) for _ in range(repeats)] for level in (1, 2)}
    (sleep1, wake1, freed1), (sleep2, wake2, freed2) = (zip(*cycles[1]), zip(*cycles[2]))
    result["sleep"] = {"level1_sleep_s": _median(sleep1), "level1_wake_s": _median(wake1),
                       "level1_freed_bytes": int(_median(freed1)),
                       "level2_sleep_s": _median(sleep2), "level2_wake_and_update_s": _median(wake2),
                       "level2_freed_bytes": int(_median(freed2))}
    say(f"sleep: {result['sleep']}")

    module = model_class(llm.model_config.model_type)(llm.model_config, None)
    tokenizer, path = llm.tokenizer, llm.model_path
    del llm
    gc.collect()
    result["rebuild"] = _build_repeatedly(
        lambda: LLM(module, params=weights, tokenizer=tokenizer, **engine_args), repeats)
    say(f"rebuild: {result['rebuild']}")
    result["reload"] = _build_repeatedly(lambda: LLM(path, **engine_args), repeats)
    say(f"reload: {result['reload']}")
    ready = {k: result[k]["first_token_s"] + v for k, v in (
        ("in_place", result["in_place"]["update_weights_s"]), ("rebuild", result["rebuild"]["build_s"]),
        ("reload", result["reload"]["build_s"]))}
    result["ready_s"] = ready  # new weights -> first token
    result["speedup_over_rebuild"] = ready["rebuild"] / ready["in_place"]
    result["speedup_over_reload"] = ready["reload"] / ready["in_place"]
    return result


def format_table(r: dict) -> str:
    gb = 1 << 30
    rows = [
        "| new weights -> first token | swap / build (s) | first token (s) | total (s) |",
        "|---|---:|---:|---:|",
        f"| in place (`update_weights`) | {r['in_place']['update_weights_s']:.3f} | "
        f"{r['in_place']['first_token_s']:.3f} | {r['ready_s']['in_place']:.3f} |",
        f"| rebuild from the in-memory tree | {r['rebuild']['build_s']:.2f} | "
        f"{r['rebuild']['first_token_s']:.2f} | {r['ready_s']['rebuild']:.2f} |",
        f"| reload from disk | {r['reload']['build_s']:.2f} | {r['reload']['first_token_s']:.2f} | "
        f"{r['ready_s']['reload']:.2f} |",
        "",
        f"In place is {r['speedup_over_rebuild']:.0f}x faster than a rebuild and "
        f"{r['speedup_over_reload']:.0f}x faster than a reload; it compiled "
        f"{r['in_place']['compilations']} executables (the first update also compiles its "
        f"layout conversion: {r['in_place']['first_update_weights_s']:.2f} s). `get_weights` took "
        f"{r['in_place']['get_weights_s']:.3f} s ({r['weight_bytes'] / gb:.2f} GiB of {r['dtype']}).",
        "",
        "| sleep / wake | s | device bytes freed |",
        "|---|---:|---:|",
        f"| sleep(level=1) | {r['sleep']['level1_sleep_s']:.3f} | {r['sleep']['level1_freed_bytes'] / gb:.2f} GiB |",
        f"| wake_up() after level 1 | {r['sleep']['level1_wake_s']:.3f} | |",
        f"| sleep(level=2) | {r['sleep']['level2_sleep_s']:.3f} | {r['sleep']['level2_freed_bytes'] / gb:.2f} GiB |",
        f"| wake_up() + update_weights after level 2 | {r['sleep']['level2_wake_and_update_s']:.3f} | |",
    ]
    return "\n".join(rows)


DESCRIPTION = __doc__


def add_cli_args(parser) -> None:
    parser.add_argument("--repeats", type=int, default=3, metavar="K",
                        help="measure each K times and report the median [default: 3]")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    add_engine_flags(parser)


def main(args) -> int:
    result = weights_benchmark(args.model, repeats=args.repeats, quiet=args.quiet,
                               **collect(args, "engine."))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(format_table(result), flush=True)
    return 0
