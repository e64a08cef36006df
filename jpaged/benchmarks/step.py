"""`jpaged bench step`: the decode step's time next to what this machine allows.

For each batch size, one decode step of the real model over sequences of `--context`
tokens (pages spread over the pool), timed after compilation (median of `--iters`), and
its floors on this machine, measured in the same process:

- bytes: the weights plus the live K/V the step reads, at the memory bandwidth a jitted
  reduction over a 1 GiB array reaches (its best of 10);
- FLOPs: the step's dots (2 x matmul weights x rows, plus attention) at the rate a dot of
  the model's MLP shape reaches alone (rows x hidden x intermediate, the weights' dtype in,
  float32 out; its best of 50).

The step can be no faster than the larger floor; the ratio says how far it is.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any

from jpaged.arg_utils import add_engine_flags, collect
from jpaged.utils import cdiv, kv_bytes_per_block

DESCRIPTION = __doc__.split("\n\n", 1)[1]


def _timed(fn, iters: int, best: bool = False) -> float:
    """Median seconds of `iters` calls after a warm one; `best`: the fastest (floors are what
    the machine reaches, and a shared machine only ever slows a run down)."""
    fn()  # compile / warm
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def measure_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s a jitted sum over an `nbytes` float32 array reads at."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / _timed(lambda: total(x).block_until_ready(), 10, best=True)


def measure_dot_rate(rows: int, k: int, n: int, dtype, packed: bool = False) -> float:
    """FLOP/s of one [rows, k] x [k, n] dot in `dtype`, float32 out (`packed`: by the
    packed-weight kernel, jpaged.ops.matmul)."""
    import jax
    import jax.numpy as jnp

    from jpaged.ops import matmul
    a = jnp.ones((rows, k), dtype)
    b = jnp.ones((k, n), dtype)
    if packed:
        b = matmul.pack(b)
        dot = jax.jit(matmul.packed_matmul)
    else:
        dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2 * rows * k * n / _timed(lambda: dot(a, b).block_until_ready(), 50, best=True)


def _decode_batch(llm, batch_size: int, context: int):
    """A decode SchedulerOutput of `batch_size` sequences with `context` tokens each, their
    pages drawn at random from the pool (none shared)."""
    import numpy as np

    from jpaged.core.scheduler_output import SchedulerOutput
    from jpaged.core.sequence import Sequence
    bs = llm.config.block_size
    pages = cdiv(context, bs)
    free = np.random.default_rng(0).permutation(llm.block_manager.num_blocks)
    if batch_size * pages > len(free):
        raise ValueError(f"{batch_size} sequences of {context} tokens need {batch_size * pages} "
                         f"blocks, the pool has {len(free)}: raise kv_cache_memory")
    seqs = []
    for b in range(batch_size):
        seq = Sequence(request=None, token_ids=[1] * context, num_prompt_tokens=context - 1)
        seq.num_computed_tokens = context - 1
        seq.block_table = [int(x) for x in free[b * pages:(b + 1) * pages]]
        seqs.append(seq)
    return SchedulerOutput(seqs, [1] * batch_size, is_prefill=False)


def step_benchmark(model=None, *, batch_sizes=(1, 8, 64), context: int = 256, iters: int = 20,
                   **engine_args) -> dict[str, Any]:
    import jax

    from jpaged.entrypoints.llm import LLM
    from jpaged.models.loader import resolve_model_path
    from jpaged.runner.sampling_tensors import sampler_mode
    from jpaged.sampling_params import SamplingParams
    llm = LLM(str(resolve_model_path(model)), **engine_args)
    runner, cfg = llm.runner, llm.model_config
    leaves = jax.tree_util.tree_leaves(llm.params)
    param_dtype = leaves[0].dtype
    weight_bytes = sum(x.nbytes for x in leaves)
    # Weights a token multiplies with: every matrix (packed ones are 3-D, stacked layers one
    # more), the tied embedding once (as the head).
    matmul_params = sum(x.size for x in leaves if x.ndim >= 2)
    kv_dtype = jax.tree_util.tree_leaves(runner.kv_pool)[0].dtype
    packed = getattr(runner.module, "packed_weights", False)
    kv_bytes_per_token = kv_bytes_per_block(cfg, 1, kv_dtype)
    bandwidth = measure_bandwidth()
    mode = sampler_mode([SamplingParams(temperature=0.0)], False, llm.config.max_logprobs)
    rows = []
    for B in batch_sizes:
        batch = _decode_batch(llm, B, context)
        inputs = runner.input_builder.build(batch)
        sampling = runner.dummy_sampling(len(inputs.logits_index), mode)
        step_s = _timed(lambda inputs=inputs, sampling=sampling: runner._run(inputs, sampling, mode), iters)
        padded = inputs.token_ids.shape[0]
        dot_rate = measure_dot_rate(padded, cfg.hidden_size, cfg.intermediate_size, param_dtype,
                                    packed=packed)
        flops = 2 * matmul_params * padded + 4 * B * context * cfg.num_heads * cfg.head_dim * cfg.num_layers
        kv_bytes = B * context * kv_bytes_per_token
        bytes_floor = (weight_bytes + kv_bytes) / bandwidth
        flop_floor = flops / dot_rate
        rows.append({"batch_size": B, "padded_rows": padded, "step_ms": step_s * 1e3,
                     "output_tokens_per_s": B / step_s, "weight_bytes": weight_bytes,
                     "kv_bytes": kv_bytes, "bytes_floor_ms": bytes_floor * 1e3, "flops": flops,
                     "dot_gflops": dot_rate / 1e9, "flop_floor_ms": flop_floor * 1e3,
                     "floor_ms": max(bytes_floor, flop_floor) * 1e3,
                     "step_over_floor": step_s / max(bytes_floor, flop_floor)})
    return {"model": str(llm.model_path), "dtype": str(param_dtype),
            "kv_cache_dtype": str(kv_dtype), "packed_weights": packed,
            "context": context, "bandwidth_gbs": bandwidth / 1e9,
            "attention_backend": runner.backend.name, "rows": rows}


def format_step(result: dict[str, Any]) -> str:
    lines = [(f"decode step, {result['dtype']} weights, {result['kv_cache_dtype']} KV, "
              f"{result['context']}-token contexts; bandwidth {result['bandwidth_gbs']:.1f} GB/s"),
             "| batch | step ms | tok/s | bytes floor ms | dot GFLOP/s | FLOP floor ms | step / floor |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch_size']} | {r['step_ms']:.1f} | {r['output_tokens_per_s']:.0f} | "
                     f"{r['bytes_floor_ms']:.1f} | {r['dot_gflops']:.0f} | {r['flop_floor_ms']:.1f} | "
                     f"{r['step_over_floor']:.2f} |")
    return "\n".join(lines)


def add_cli_args(parser) -> None:
    parser.add_argument("--batch-sizes", default="1,8,64",
                        help="decode batch sizes, comma-separated [default: 1,8,64]")
    parser.add_argument("--context", type=int, default=256, help="tokens per sequence [default: 256]")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per batch size [default: 20]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_flags(parser)


def main(args) -> int:
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    result = step_benchmark(args.model, batch_sizes=sizes, context=args.context,
                            iters=args.iters, **collect(args, "engine."))
    print(json.dumps(result, indent=2) if args.json else format_step(result), flush=True)
    return 0
