#!/usr/bin/env python3
"""Tensor parallelism proven without a GPU: the engine's sharded decode and prefill steps
(Pallas backend, bfloat16, layers under scan) compiled deviceless for 8 x A100 / 8 x H100,
with the collectives read from the compiled HLO and a roofline per GPU.

Default: Llama-2-70B split over 8 GPUs; decode of 64 sequences at 2048 tokens of context
each; prefill of 4 prompts of 512 tokens; block tables for 4096 tokens (the model's context).
Prints a Markdown table:

  all-reduce     collectives per step (count, MB: the result buffers one GPU reduces)
  NVLink MB      what one GPU sends one way: a ring all-reduce moves 2(N-1)/N of its buffer
  HBM GB         one GPU's weights read once + its heads' live K/V read once + new K/V written
  ms: HBM / FLOP / NVLink   each at the GPU's peak (HBM bandwidth, bf16 dense tensor-core
                 FLOP/s, NVLink one-way bandwidth: A100 300 GB/s, H100 450 GB/s)
  step ms        max(HBM, FLOP) + NVLink: each layer's all-reduce feeds the next matmul;
                 in brackets max(all three), were the collectives hidden
  compiled ms    step ms with the copies the compiled program makes: scanned layers slice
                 each layer's weights out of the stack into a copy (read + written) before
                 its matmuls; unrolled layers (--unrolled, the engine's default) make none
  tok/s          tokens per second of the step at `step ms`, all GPUs together
  GB/GPU         weights per GPU (the split layers + replicated embedding, head and norms)
                 and the compiled step's arguments (weights + the pool's shard)
  temp MB        memory_analysis().temp_size_in_bytes (the pool is never copied)

ESTIMATES FROM COMPILED PROGRAMS, NOT MEASUREMENTS: no latency per collective (NCCL's is
several microseconds, and a 70B step has 160 of them), no autotuning (deviceless), no overlap
of anything. Needs the CUDA plugin (`pip install "jax[cuda12-local]==0.10.2"`); runs with
JAX_PLATFORMS=cpu (set here). Run:
  python scripts/gpu/tp_proof.py                              # the README table
  python scripts/gpu/tp_proof.py --gpu h100 --batch 8 64 --json tp.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", nargs="+", choices=["a100", "h100"], default=["a100", "h100"])
    p.add_argument("--model", choices=["llama2-70b", "llama2-7b"], default="llama2-70b")
    p.add_argument("--tp", type=int, default=8, help="GPUs the model is split over")
    p.add_argument("--batch", type=int, nargs="+", default=[64], help="decode sequences")
    p.add_argument("--context", type=int, default=2048, help="tokens of every decode sequence")
    p.add_argument("--prefill", type=int, nargs=2, default=[4, 512], metavar=("SEQS", "TOKENS"),
                   help="prefill prompts and tokens in each (0 0: no prefill row)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--unrolled", action="store_true",
                   help="unrolled layers (the engine's default): no weight copies, longer compile")
    p.add_argument("--json", metavar="FILE", help="also write every number to this JSON file")
    return p


def table(rows) -> str:
    out = ["| GPUs | step | all-reduce (count, MB) | NVLink MB | HBM GB | ms: HBM / FLOP / NVLink "
           "| step ms | compiled ms | tok/s | GB/GPU: weights / args | temp MB | compile s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        what = (f"decode {r['num_seqs']} x {r['context']}" if r["kind"] == "decode"
                else f"prefill {r['num_seqs']} x {r['new_tokens']}")
        ar = r["collectives"].get("all-reduce", {"count": 0, "bytes": 0})
        others = {k: v for k, v in r["collectives"].items() if k != "all-reduce"}
        mem = r["memory_analysis"]
        out.append(
            f"| {r['tp']} x {r['gpu'].upper()} | {what} | {ar['count']}, {ar['bytes'] / 1e6:,.1f}"
            f"{' + ' + str(others) if others else ''} | {r['link_bytes_per_gpu'] / 1e6:,.1f} | "
            f"{r['hbm_bytes'] / 1e9:,.2f} | {r['t_hbm_s'] * 1e3:,.2f} / {r['t_flops_s'] * 1e3:,.2f}"
            f" / {r['t_link_s'] * 1e3:,.2f} | {r['step_s'] * 1e3:,.2f} ({r['overlapped_s'] * 1e3:,.2f})"
            f" | {r['compiled_step_s'] * 1e3:,.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['weights_bytes_per_gpu'] / 1e9:.2f} / {mem['argument_size_in_bytes'] / 1e9:.2f} | "
            f"{mem['temp_size_in_bytes'] / 1e6:,.1f} | {r['compile_s']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"  # before jax: the CUDA plugin fails cuInit without a GPU
    from jpaged.aot import parallel, step
    from jpaged.aot.targets import unavailable_message
    message = unavailable_message(args.gpu)
    if message:
        print(message, file=sys.stderr)
        return 2
    config = step.MODELS[args.model]()
    scenarios = [parallel.Scenario.decode(b, args.context, max_model_len=args.max_model_len)
                 for b in args.batch]
    if args.prefill[0]:
        scenarios.append(parallel.Scenario.prefill(*args.prefill, max_model_len=args.max_model_len))
    rows = []
    for gpu in args.gpu:
        for scenario in scenarios:
            sharded = parallel.sharded_step_specs(config, scenario.bucket(), gpu, args.tp,
                                                  scan_layers=not args.unrolled)
            start = time.perf_counter()
            compiled = parallel.compile_sharded_step(sharded)
            compile_s = time.perf_counter() - start
            row = parallel.roofline(sharded, scenario, compiled)
            row.update(model=args.model, scan_layers=not args.unrolled, compile_s=compile_s)
            rows.append(row)
            print(f"compiled {args.model} {scenario.kind} for {args.tp} x {gpu} in "
                  f"{row['compile_s']:.1f} s", file=sys.stderr, flush=True)
    print(f"{args.model} over {args.tp} GPUs, bfloat16 weights and KV, "
          f"{'unrolled' if args.unrolled else 'scanned'} layers. Estimates from deviceless "
          f"compiles, not measurements.\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
