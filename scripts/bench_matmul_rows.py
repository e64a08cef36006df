"""What a bucket's padding rows cost the packed CPU matmul: SmolLM2-135M's four dense layers
(qkv, o, gate_up, down) x 30, cold weights, timed with all rows real against only some
(`packed_matmul`'s num_rows, as the model passes a step's real token count).

    python scripts/bench_matmul_rows.py --cases 128/128,192/138,192/192,512/400,512/512
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.ops import matmul

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # qkv, o, gate_up, down: [K, N]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="128/128,192/138,192/192,256/200,256/256,512/400,512/512",
                    help="bucket rows / real rows, comma-separated")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("/")) for c in args.cases.split(",")]
    rng = np.random.default_rng(0)
    layers = [[matmul.pack(jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)) for s in SHAPES]
              for _ in range(args.layers)]

    @jax.jit
    def chain(x, rows):
        for qkv, o, gate_up, down in layers:
            a = matmul.packed_matmul(x, qkv, num_rows=rows)
            x = x + matmul.packed_matmul(a[:, :576], o, num_rows=rows)
            g = matmul.packed_matmul(x, gate_up, num_rows=rows)
            x = x + matmul.packed_matmul(g[:, :1536] * g[:, 1536:], down, num_rows=rows) * 1e-3
        return x

    xs = {m: jnp.asarray(rng.standard_normal((m, 576), np.float32)) for m, _ in cases}
    for m, r in cases:  # compile every shape first
        chain(xs[m], jnp.int32(r)).block_until_ready()
    times = {c: [] for c in cases}
    for _ in range(args.repeat):  # interleaved, so that the machine's drift hits every case alike
        for m, r in cases:
            start = time.perf_counter()
            chain(xs[m], jnp.int32(r)).block_until_ready()
            times[(m, r)].append(time.perf_counter() - start)
    for m, r in cases:
        print(f"bucket {m:5d} rows, {r:5d} real: {np.median(times[(m, r)]) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
