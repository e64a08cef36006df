"""Offline throughput: replay a workload through `LLM.generate` and time it.

All requests are queued at once and every one generates exactly its `max_tokens`
(`ignore_eos`), so engines compare on the same work. `jpaged bench throughput` and
`scripts/benchmark_throughput.py` both run `main`, so the numbers are those of the code
users run.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

from jpaged.arg_utils import add_engine_flags, collect

from .workloads import load_workload, log, process_start


def _params(workload, temperature: float, seed: int | None = None):
    from jpaged.sampling_params import SamplingParams
    return [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=temperature,
                           seed=None if seed is None else seed + i)
            for i, r in enumerate(workload)]


def run_throughput(llm, workload: list[dict[str, Any]], *, temperature: float = 0.0,
                   warmup: bool = True, seed: int | None = 0, quiet: bool = False) -> dict[str, Any]:
    """Warm up (`LLM.warmup`: every executable compiled or loaded), then time `llm.generate`
    over the whole workload (all requests queued at once, no progress bar). Returns the
    result dict (see `throughput_benchmark`)."""
    import jax
    params = _params(workload, temperature, seed)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in workload]
    compilations_start = llm.num_compilations()
    warmup_s = 0.0
    if warmup:
        log("warm-up: compiling every executable (untimed)", quiet)
        warmup_s = llm.warmup(use_tqdm=not quiet)
    warmup_compilations = llm.num_compilations() - compilations_start

    llm.stats.record_memory = True  # the pool's breakdown per step (kv_memory_shares)
    llm.stats.reset()
    preemptions_before = llm.scheduler.num_preemptions
    compilations_before = llm.num_compilations()
    log(f"timed run: {len(workload)} requests", quiet)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - start
    first_pass_s = time.time() - process_start()

    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in workload)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(r["max_tokens"] for r in workload)
    if output_tokens != expected:
        short = [o.request_id for o, r in zip(outputs, workload)
                 if len(o.outputs[0].token_ids) != r["max_tokens"]]
        raise RuntimeError(f"{len(short)} requests generated fewer tokens than their max_tokens "
                           f"({output_tokens} of {expected}); is prompt + max_tokens over "
                           f"max_model_len={llm.max_model_len}?")
    steps = llm.stats.steps
    kv = llm.kv_cache_stats()
    return {
        "requests": len(workload),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall_s,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
        "kv_utilization_peak": llm.stats.kv_utilization_peak,
        "kv_utilization_mean": llm.stats.kv_utilization_mean,
        "kv_policy": llm.config.kv_policy,
        "enable_block_sharing": llm.config.enable_block_sharing,
        "mean_batch_size": llm.stats.mean_batch_size,
        # mean share of the pool per step: token_states, reserved, internal_/external_
        # fragmentation, free (BlockManager.memory_breakdown)
        "kv_memory_shares": llm.stats.memory_shares(),
        "preemptions": llm.scheduler.num_preemptions - preemptions_before,
        "compilations": llm.num_compilations() - compilations_before,
        "steps": steps,
        "load_s": llm.load_s,
        "warmup": warmup,
        "warmup_s": warmup_s,
        "warmup_compilations": warmup_compilations,
        "first_pass_s": first_pass_s,
        "first_pass_output_tokens_per_s": output_tokens / first_pass_s,
        "temperature": temperature,
        "kv_cache_dtype": str(jax.tree_util.tree_leaves(llm.runner.kv_pool)[0].dtype),
        "kv_total_blocks": kv["total_blocks"],
        "kv_pool_bytes": kv["pool_bytes"],
        "kv_pool_bytes_per_device": kv["pool_bytes_per_device"],
        "weight_bytes_per_device": kv["weight_bytes_per_device"],
        "tensor_parallel_size": llm.config.tensor_parallel_size,
        "num_processes": llm.config.num_processes,
        "block_size": llm.config.block_size,
        "max_num_seqs": llm.config.max_num_seqs,
        "max_num_batched_tokens": llm.config.max_num_batched_tokens,
        "max_model_len": llm.max_model_len,
        "attention_backend": getattr(llm.runner.backend, "name", llm.config.attention_backend),
    }


def throughput_benchmark(workload_path, model=None, *, num_requests: int | None = None,
                         temperature: float = 0.0, warmup: bool = True, baseline: str | None = None,
                         hf_batch_size: int = 16, quiet: bool = False,
                         **engine_args) -> dict[str, Any]:
    """Load the engine, replay the workload (see `run_throughput`) and, with
    `baseline="hf"`, the same workload through transformers in this process afterwards.

    Keys: requests, prompt_tokens, output_tokens, wall_s, output_tokens_per_s,
    total_tokens_per_s, kv_utilization_peak / _mean (tokens stored / slots allocated,
    per step), kv_policy, mean_batch_size (sequences per step with decode rows),
    kv_memory_shares (the pool's mean breakdown per step), preemptions and compilations (during the timed run), load_s, warmup_s,
    model, dtype, max_num_seqs, ...; with the baseline also hf_output_tokens_per_s and
    speedup_vs_hf (jpaged / transformers output tokens/s).
    """
    from jpaged.entrypoints.llm import LLM
    from jpaged.models.loader import resolve_model_path

    if baseline not in (None, "hf"):
        raise ValueError(f"baseline must be 'hf' or None, got {baseline!r}")
    workload = load_workload(workload_path, num_requests)
    path = resolve_model_path(model)
    log(f"loading {path}", quiet)
    llm = LLM(str(path), **engine_args)
    log(f"loaded in {llm.load_s:.1f} s", quiet)
    import jax
    dtype = str(jax.tree_util.tree_leaves(llm.params)[0].dtype)
    result = {"model": str(path), "dtype": dtype, "workload": str(workload_path)}
    result.update(run_throughput(llm, workload, temperature=temperature, warmup=warmup,
                                 seed=llm.config.seed, quiet=quiet))
    if baseline == "hf":
        del llm  # free the pool and weights before transformers loads its copy
        gc.collect()
        from .hf_baseline import hf_throughput
        result.update(hf_throughput(path, workload, dtype, hf_batch_size, quiet))
        result["speedup_vs_hf"] = result["output_tokens_per_s"] / result["hf_output_tokens_per_s"]
    return result


def format_throughput(result: dict[str, Any]) -> str:
    """A human-readable summary of a `throughput_benchmark` result."""
    lines = [f"{result['requests']} requests, {result['prompt_tokens']} prompt + "
             f"{result['output_tokens']} output tokens in {result['wall_s']:.2f} s "
             f"({result['model']}, {result['dtype']})",
             f"  output tokens/s   {result['output_tokens_per_s']:.1f}",
             f"  total tokens/s    {result['total_tokens_per_s']:.1f}",
             f"  KV utilization    mean {result['kv_utilization_mean']:.3f}, "
             f"peak {result['kv_utilization_peak']:.3f} (kv_policy {result['kv_policy']})",
             f"  mean batch size   {result['mean_batch_size']:.1f} sequences per decode step",
             f"  preemptions       {result['preemptions']}",
             f"  compilations      {result['compilations']} (timed run; "
             f"{result['warmup_compilations']} in warm-up)",
             f"  load / warm-up    {result['load_s']:.1f} s / {result['warmup_s']:.1f} s "
             f"(warmup={result['warmup']})"]
    if "hf_output_tokens_per_s" in result:
        lines.append(f"  transformers      {result['hf_output_tokens_per_s']:.1f} output tokens/s "
                     f"(batches of {result['hf_batch_size']}): jpaged is "
                     f"{result['speedup_vs_hf']:.2f}x")
    return "\n".join(lines)


DESCRIPTION = """\
Replay a workload (a shipped name such as sharegpt_short_64, or a JSON file: a list of
{"prompt_token_ids": [...], "max_tokens": N}) through LLM.generate with all requests
queued at once; every request generates exactly N tokens (ignore_eos, greedy unless
--temperature). Prints output and total tokens/s, KV pool utilization (tokens stored /
slots allocated, per step: mean and peak), preemptions and step compilations during the
timed run, load and warm-up seconds.

Warm-up (--warmup, the default; --no-warmup to time a cold engine): every executable a
request can need is compiled, or loaded from disk, before the timed run (LLM.warmup), so
the JSON's 'compilations' is 0 and the run measures steady-state serving; warm-up time
is reported in warmup_s, start-up in load_s, and first_pass_s runs from process start to
the end of the timed run. With --no-warmup compilations are part of wall_s.

--baseline hf then runs the same workload through transformers generate in this
process (after freeing jpaged's pool): static batches of --hf-batch-size in workload
order, left padding, greedy, each batch generating its longest max_tokens, counting
only each request's own N as output tokens; it reports hf_output_tokens_per_s and
speedup_vs_hf."""


def add_cli_args(parser) -> None:
    parser.add_argument("--workload", required=True, metavar="NAME|FILE.json",
                        help="a shipped workload (sharegpt_short_64, sharegpt_256, alpaca_256) or "
                             'a JSON list of {"prompt_token_ids": [...], "max_tokens": N}')
    parser.add_argument("--num-requests", type=int, default=None, metavar="K",
                        help="use only the first K requests")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="see above [default: on]")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature of every request [default: 0, greedy]")
    parser.add_argument("--baseline", choices=("hf",), default=None,
                        help="also run the workload through transformers generate and report the ratio")
    parser.add_argument("--hf-batch-size", type=int, default=16, metavar="B",
                        help="requests per static transformers batch [default: 16]")
    parser.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    add_engine_flags(parser)


def main(args) -> int:
    result = throughput_benchmark(
        args.workload, args.model, num_requests=args.num_requests, temperature=args.temperature,
        warmup=args.warmup, baseline=args.baseline, hf_batch_size=args.hf_batch_size,
        quiet=args.quiet, **collect(args, "engine."))
    print(json.dumps(result, indent=2) if args.json else format_throughput(result), flush=True)
    return 0
