#!/usr/bin/env python3
"""Engine throughput on a real GPU (A100 / H100): the offline benchmark of
`jpaged bench throughput` (`jpaged.benchmarks.throughput.throughput_benchmark`) with GPU
defaults: Pallas attention kernels, bfloat16, a KV pool sized from the
device's memory, 256 sequences per step.

A workload is a JSON list of {"prompt_token_ids": [...], "max_tokens": N}
(every request generates exactly N tokens). Without --workload a synthetic one
is drawn with the paper's length statistics (log-normal; ShareGPT prompts ~161
/ outputs ~338 tokens, Alpaca ~19 / ~58) and random token ids.

  python scripts/gpu/bench_engine.py --synthetic sharegpt --num-requests 1000
  python scripts/gpu/bench_engine.py --model /models/Llama-2-7b-hf \\
      --workload sharegpt_1000.json --json --out result.json
  python scripts/gpu/bench_engine.py --attention-backend xla   # the jnp backend, to compare

The warm-up (default --warmup) compiles every executable a request can need
first (LLM.warmup); the JSON's 'compilations' should then read 0. Compare the result with
`scripts/gpu/roofline.py` (the step time floor of the compiled program).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

SYNTHETIC = {  # mean prompt, mean output, sigma of the log-normal
    "sharegpt": (161.0, 338.0, 0.9),
    "alpaca": (19.3, 58.5, 0.6),
}


def build_parser() -> argparse.ArgumentParser:
    from jpaged.arg_utils import parse_bytes

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--workload", metavar="FILE.json", help="workload file")
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC), default="sharegpt",
                     help="draw a synthetic workload of --num-requests requests [default: sharegpt]")
    p.add_argument("--num-requests", type=int, default=1000,
                   help="requests (synthetic), or the first K of --workload [default: 1000]")
    p.add_argument("--max-len", type=int, default=2048,
                   help="synthetic: prompt + output never exceeds this [default: 2048]")
    p.add_argument("--model", default=None,
                   help="HF folder or .gguf [default: the embedded SmolLM2-135M-Instruct]")
    p.add_argument("--attention-backend", default="pallas",
                   choices=["pallas", "xla", "reference", "auto"], help="[default: pallas]")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="bytes for the KV pool (units ok: 40GiB) [default: --kv-fraction of the "
                        "device's memory]")
    p.add_argument("--kv-fraction", type=float, default=0.5,
                   help="KV pool as a fraction of the device's memory when --kv-cache-memory is "
                        "not given; leave room for weights and step temporaries [default: 0.5]")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-cpu", action="store_true",
                   help="run even without a GPU (a smoke test; the numbers mean nothing)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result here")
    return p


def synthetic_workload(name: str, n: int, vocab: int, max_len: int, seed: int) -> list[dict]:
    import numpy as np

    mean_in, mean_out, sigma = SYNTHETIC[name]
    rng = np.random.default_rng(seed)
    draw = lambda mean: rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)
    ins = np.clip(draw(mean_in).round(), 4, max_len // 2).astype(int)
    outs = np.clip(draw(mean_out).round(), 4, max_len - ins).astype(int)
    return [{"prompt_token_ids": rng.integers(3, vocab, int(i)).tolist(), "max_tokens": int(o)}
            for i, o in zip(ins, outs)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from jpaged.benchmarks.throughput import format_throughput, throughput_benchmark
    from jpaged.models.loader import load_config, resolve_model_path

    dev = jax.devices()[0]
    if dev.platform != "gpu" and not args.allow_cpu:
        print(f"no GPU found (jax sees {dev.platform}: {dev.device_kind}); "
              "pass --allow-cpu for a smoke test", file=sys.stderr)
        return 2
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}", file=sys.stderr)
    kv = args.kv_cache_memory
    if kv is None:
        stats = dev.memory_stats() or {}
        limit = stats.get("bytes_limit")
        kv = int(args.kv_fraction * limit) if limit else None  # None: the engine's CPU default

    with tempfile.TemporaryDirectory() as tmp:
        path = args.workload
        if path is None:
            vocab = load_config(resolve_model_path(args.model)).vocab_size
            path = os.path.join(tmp, "workload.json")
            with open(path, "w") as f:
                json.dump(synthetic_workload(args.synthetic, args.num_requests, vocab,
                                             args.max_len, args.seed), f)
        if args.max_model_len is None and args.workload is None:
            args.max_model_len = args.max_len  # the synthetic requests' bound
        engine = dict(attention_backend=args.attention_backend, dtype=args.dtype,
                      kv_cache_memory=kv, block_size=args.block_size,
                      max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      max_model_len=args.max_model_len,
                      enable_prefix_caching=not args.no_prefix_caching, seed=args.seed)
        result = throughput_benchmark(
            path, args.model, num_requests=args.num_requests if args.workload else None,
            temperature=args.temperature, warmup=args.warmup, **engine)
    result["device"] = dev.device_kind
    if args.workload is None:
        result["workload"] = f"synthetic {args.synthetic} x {args.num_requests}"
    print(json.dumps(result, indent=2) if args.json else format_throughput(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
