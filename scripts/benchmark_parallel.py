#!/usr/bin/env python3
"""Tensor parallelism on this machine: `jpaged bench throughput` on one device, on N
simulated CPU devices of one process, and over N processes (`jpaged worker`s on
127.0.0.1, one device each), one after the other; one JSON line each with throughput and
per-device bytes of weights and KV pool.

    python scripts/benchmark_parallel.py --tp 3 --workload sharegpt_short_64 --num-requests 16

Simulated devices and local processes share this machine's cores: tp > 1 here measures
the cost of splitting (collectives, per-step broadcasts), never a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys


def bench(argv: list[str], env: dict, workers: list[list[str]] = ()) -> dict:
    cmd = [sys.executable, "-m", "jpaged", "bench", "throughput", "--json", "--quiet", *argv]
    helpers = [subprocess.Popen([sys.executable, "-m", "jpaged", "worker", *w], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for w in workers]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    for h in helpers:
        h.wait(120)
    return json.loads(out[out.index("{"):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--workload", default="sharegpt_short_64")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--engine-args", default="--max-model-len 1024 --kv-cache-memory 256MiB",
                   help="more engine flags for every run")
    a = p.parse_args()
    base = ["--workload", a.workload, "--num-requests", str(a.num_requests), *a.engine_args.split()]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    split = ["--tensor-parallel-size", str(a.tp)]
    engine = [*a.engine_args.split(), *split, "--num-processes", str(a.tp),
              "--coordinator-address", f"127.0.0.1:{port}"]
    multi = [*base, *engine[len(a.engine_args.split()):]]
    runs = [
        ("1 device, packed weights", base, env, []),
        ("1 device, unpacked weights", [*base, "--no-pack-weights"], env, []),
        (f"{a.tp} devices, 1 process", [*base, *split],
         dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={a.tp}"), []),
        (f"{a.tp} processes", [*multi, "--process-id", "0"], env,
         [[*engine, "--process-id", str(i)] for i in range(1, a.tp)]),
    ]
    for name, argv, run_env, workers in runs:
        r = bench(argv, run_env, workers)
        print(json.dumps({"run": name, **{k: r[k] for k in (
            "output_tokens_per_s", "total_tokens_per_s", "steps", "wall_s", "load_s",
            "weight_bytes_per_device", "kv_pool_bytes_per_device", "kv_pool_bytes",
            "tensor_parallel_size", "num_processes")}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
