#!/usr/bin/env python3
"""Roofline of the engine's decode step on A100 / H100, from compiled programs.

Compiles the engine's whole jitted decode step (embed -> the layers, with the
Pallas kernels reading/writing the paged pool -> logits -> greedy sampling)
deviceless for each GPU, for SmolLM2-135M (the default model) and a
Llama-2-7B-shaped config, bfloat16 (or, with `--model opt-13b`, OPT-13B in
float16 on one A100, the vLLM paper's setting), every sequence at `--context`
tokens, and prints a Markdown table:

  GFLOP, GB     FLOPs and HBM bytes of one step (all layers, sampling included)
  floor         max(FLOPs / peak, bytes / bandwidth); A100-SXM4-80GB: 312 TFLOP/s
                bf16 dense, 2.039 TB/s; H100 SXM: 989 TFLOP/s, 3.35 TB/s
  tok/s         batch / floor: an upper bound on decode throughput
  attn kernel   K/V bytes the attention kernel reads (from its tiling), all its
                bytes (plus q, float32 partials, block tables), and the minimum:
                every live K/V byte read once
  compiled /    compiled: the program's traffic as XLA counts it (+ the kernel);
  ideal         ideal: weights + live K/V read once + new K/V written once
  temp MB       memory_analysis().temp_size_in_bytes (the pool is not copied)

These are ESTIMATES FROM COMPILED PROGRAMS, NOT MEASUREMENTS. How they are read
(jpaged/aot/hlo_cost.py, `step_cost`): a deviceless executable has no cost analysis
(`compiled.cost_analysis()` is None), so XLA's HloCostAnalysis is run over the
optimized HLO, with every loop counted as many times as it runs, the pool-shaped
buffers taken out (XLA would count each in-place scatter as a whole-pool
read + write), and the Pallas kernel (opaque to XLA) added from a model of
its tiles. Deviceless compiles do no autotuning, and launch overheads, cache
hits and overlap are ignored: a real step is slower.

Needs the CUDA plugin (`pip install "jax[cuda12-local]==0.10.2"`) and runs
with JAX_PLATFORMS=cpu (set here). Run:
  python scripts/gpu/roofline.py                      # the README table
  python scripts/gpu/roofline.py --batch 1 64 --context 2048 --gpu h100
  python scripts/gpu/roofline.py --model opt-13b --gpu a100 --context 1024
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
import time

# facebook/opt-13b's config.json (the paper's one-GPU model), served in float16 as there.
OPT_13B = dict(model_type="opt", vocab_size=50272, hidden_size=5120, ffn_dim=20480,
               num_hidden_layers=40, num_attention_heads=40, max_position_embeddings=2048,
               do_layer_norm_before=True, word_embed_proj_dim=5120, enable_bias=True,
               activation_function="relu", bos_token_id=2, eos_token_id=2, torch_dtype="float16")


def model_config(name: str):
    """(ModelConfig, weight and KV dtype) of a `--model` choice."""
    import jax.numpy as jnp
    from jpaged.aot import step
    from jpaged.models import ModelConfig
    if name == "opt-13b":
        return ModelConfig.from_hf_dict(OPT_13B), jnp.float16
    return step.MODELS[name](), jnp.bfloat16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", nargs="+", choices=["a100", "h100"], default=["a100", "h100"])
    p.add_argument("--model", nargs="+", choices=["smollm2-135m", "llama2-7b", "opt-13b"],
                   default=["smollm2-135m", "llama2-7b"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256],
                   help="sequences decoding together (padded to the engine's bucket, >= 8)")
    p.add_argument("--context", type=int, default=1024, help="tokens in every sequence's context")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="block tables are max_model_len / block_size pages wide (engine rule)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-memory-fraction", type=float, default=0.8,
                   help="pool size: this fraction of the GPU's 80 GB minus the weights")
    p.add_argument("--fill-pool", action="store_true",
                   help="size the pool to the whole budget instead of what the batch needs")
    p.add_argument("--json", metavar="FILE", help="also write every number to this JSON file")
    p.add_argument("--keep-dumps", metavar="DIR", help="keep the XLA dumps (HLO, PTX) here")
    return p


def row(model_name, gpu, batch, args, dump_dir):
    import jax.numpy as jnp
    from jpaged.aot import hlo_cost, step
    from jpaged.pallas_kernels.gpus import GPUS
    from jpaged.runner.input_builder import bucket as pad_bucket
    from jpaged.utils import cdiv

    cfg, dtype = model_config(model_name)
    target = GPUS[gpu]
    # Shapes first (weights' bytes decide the pool's size), then the real compile.
    probe = step.Bucket.decode(8, max_model_len=args.max_model_len, num_blocks=1,
                               block_size=args.block_size)
    weights = hlo_cost.weight_bytes(step.step_specs(cfg, probe, param_dtype=dtype, kv_dtype=dtype))
    kv_budget = int(args.kv_memory_fraction * target.memory_bytes) - weights
    budget_blocks = step.blocks_for_memory(cfg, kv_budget, args.block_size, dtype)
    B = pad_bucket(batch, 8)
    # The pool holds this batch (and one max_model_len sequence), no more: a pool filling
    # the GPU makes XLA rematerialize (recompute) the logits matmul to fit its temporaries,
    # which would blur the estimate (see --kv-memory-fraction).
    pages = cdiv(args.max_model_len, args.block_size)
    blocks_needed = batch * cdiv(args.context + 1, args.block_size)
    num_blocks = max(blocks_needed, pages) + 1
    if args.fill_pool:
        num_blocks = budget_blocks
    elif num_blocks > budget_blocks:
        # The batch does not fit (the row is kept for its arithmetic, marked "no"): half
        # the budget keeps the compile clear of rematerialization, and the kernel's
        # traffic does not depend on the pool's size.
        num_blocks = budget_blocks // 2
    b = step.Bucket.decode(B, max_model_len=args.max_model_len, num_blocks=num_blocks,
                           block_size=args.block_size)
    start = time.perf_counter()
    compiled = step.compile_step(cfg, b, gpu, dump_to=dump_dir, param_dtype=dtype, kv_dtype=dtype)
    compile_s = time.perf_counter() - start
    cost = hlo_cost.step_cost(compiled, cfg, b, [args.context] * batch, gpu, kv_dtype=dtype)
    mem = compiled.memory_analysis()

    # The kernel's launch grid as compiled, against the model's.
    grid = None
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
        m = re.search(r"jpaged_paged_attention_decode grid: \[(\d+), (\d+), (\d+)\]",
                      open(path).read())
        if m:
            grid = tuple(map(int, m.groups()))
    if grid is not None and sorted(grid) != sorted(cost["kernel"]["grid"]):
        print(f"warning: compiled grid {grid} != modelled {cost['kernel']['grid']}", file=sys.stderr)

    t_flops = cost["flops"] / target.peak_flops
    t_bytes = cost["bytes"] / target.bandwidth
    floor = max(t_flops, t_bytes)
    k = cost["kernel"]
    # Ideal: the weights and every live K/V byte read once, the new K/V written once, the
    # useful FLOPs (no padded rows) -- what any implementation must at least move / do.
    ideal_bytes = weights + k["min_kv_bytes"] + cost["kv_write_bytes"]
    ideal_flops = cost["xla_flops"] * batch / B + k["useful_flops"]
    ideal_floor = max(ideal_bytes / target.bandwidth, ideal_flops / target.peak_flops)
    return {
        "model": model_name, "dtype": str(jnp.dtype(dtype)), "gpu": gpu, "batch": batch,
        "bucket": B, "context": args.context,
        "flops": cost["flops"], "bytes": cost["bytes"], "weights_bytes": weights,
        "xla_flops": cost["xla_flops"], "xla_bytes": cost["xla_bytes"],
        "xla_raw": cost["xla_raw"],
        "kernel_kv_bytes": k["kv_bytes"], "kernel_bytes": k["bytes accessed"],
        "min_kv_bytes": k["min_kv_bytes"], "kernel_grid": grid or k["grid"],
        "t_flops_s": t_flops, "t_bytes_s": t_bytes, "floor_s": floor,
        "bound": "memory" if t_bytes >= t_flops else "compute",
        "tokens_per_s": batch / floor,
        "ideal_bytes": ideal_bytes, "ideal_flops": ideal_flops, "ideal_floor_s": ideal_floor,
        "ideal_tokens_per_s": batch / ideal_floor,
        "temp_bytes": mem.temp_size_in_bytes, "pool_bytes": step.pool_bytes(cfg, b, dtype),
        "fits": blocks_needed <= budget_blocks, "compile_s": compile_s,
    }


def table(rows) -> str:
    out = ["| model | GPU | batch (bucket) | GFLOP | GB: compiled / ideal | floor ms: compiled / ideal "
           "| tok/s: compiled / ideal | attn kernel GB: K/V read / all / min K/V | temp MB | fits 80 GB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['gpu'].upper()} | {r['batch']} ({r['bucket']}) | "
            f"{r['flops'] / 1e9:,.1f} | {r['bytes'] / 1e9:,.2f} / {r['ideal_bytes'] / 1e9:,.2f} | "
            f"{r['floor_s'] * 1e3:,.2f} / {r['ideal_floor_s'] * 1e3:,.2f} | "
            f"{r['tokens_per_s']:,.0f} / {r['ideal_tokens_per_s']:,.0f} | "
            f"{r['kernel_kv_bytes'] / 1e9:.3f} / {r['kernel_bytes'] / 1e9:.3f} / "
            f"{r['min_kv_bytes'] / 1e9:.3f} | "
            f"{r['temp_bytes'] / 1e6:,.1f} | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"  # before jax: the CUDA plugin fails cuInit without a GPU
    from jpaged.aot.targets import unavailable_message
    message = unavailable_message(args.gpu)
    if message:
        print(message, file=sys.stderr)
        return 2
    rows = []
    for model_name in args.model:
        for gpu in args.gpu:
            for batch in args.batch:
                with tempfile.TemporaryDirectory() as tmp:
                    dump = args.keep_dumps and os.path.join(
                        args.keep_dumps, f"{model_name}-{gpu}-b{batch}")
                    r = row(model_name, gpu, batch, args, dump or tmp)
                rows.append(r)
                print(f"compiled {model_name} {gpu} batch {batch} in {r['compile_s']:.1f} s",
                      file=sys.stderr, flush=True)
    dtypes = " / ".join(dict.fromkeys(f"{r['model']}: {r['dtype']}" for r in rows))
    print(f"Decode step, every sequence at {args.context} tokens of context, weights and KV in "
          f"{dtypes}, block size {args.block_size}. Estimates from compiled programs (deviceless "
          f"XLA compiles), not measurements.\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
