"""Decode attention latency on a real GPU: the paged kernel vs contiguous caches.

The paper's Figure 18 measured the PagedAttention kernel against a kernel
reading one contiguous cache per sequence, same shapes. This script times,
for each (batch, context) pair:

  paged           jpaged's kernel, shuffled block tables (pages scattered)
  paged-seq       jpaged's kernel, block tables in order (paging, no scatter)
  xla-contiguous  XLA einsum attention on a contiguous [seqs, kv_heads,
                  context, head_dim] cache (masked softmax in float32)
  jax-contiguous  JAX's own Pallas Triton decode kernel
                  (jax.experimental.pallas.ops.gpu.decode_attention.gqa) on a
                  contiguous [seqs, context, kv_heads, head_dim] cache; its
                  time includes the transpose that op does internally

and prints microseconds per call and effective bandwidth (live K/V bytes /
time). Needs an NVIDIA GPU (A100 or H100); run e.g.
  python scripts/gpu/bench_kernel.py --batch 1 8 64 --context 256 1024 4096
"""

from __future__ import annotations

import argparse
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--gpu",
        choices=["auto", "a100", "h100"],
        default="auto",
        help="tunables table to use (default: detected)",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    p.add_argument("--context", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--num-layers",
        type=int,
        default=1,
        help="layers in the stacked pool (the kernel reads one)",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument(
        "--impl",
        nargs="+",
        default=["paged", "paged-seq", "xla-contiguous", "jax-contiguous"],
        choices=["paged", "paged-seq", "xla-contiguous", "jax-contiguous"],
    )
    p.add_argument("--csv", help="also write the results to this CSV file")
    p.add_argument(
        "--interpret",
        action="store_true",
        help="smoke test without a GPU: Pallas interpret mode (slow; the times mean nothing)",
    )
    return p


def _time(fn, args, warmup, iters):
    for _ in range(warmup):
        out = fn(*args)
    out.block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jpaged.pallas_kernels import paged_attention
    from jpaged.utils import cdiv

    if jax.devices()[0].platform != "gpu" and not args.interpret:
        raise SystemExit("bench_kernel.py needs an NVIDIA GPU (or --interpret)")
    dtype = jnp.dtype(args.dtype)
    gpu = None if args.gpu == "auto" else args.gpu
    h, kvh, d, bs = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batch:
        for ctx in args.context:
            pages = cdiv(ctx, bs)
            num_blocks = batch * pages
            pool_shape = (args.num_layers, kvh, num_blocks, bs, d)
            key = jax.random.PRNGKey(batch * 100003 + ctx)
            k1, k2, k3 = jax.random.split(key, 3)
            kp = jax.random.normal(k1, pool_shape, dtype)
            vp = jax.random.normal(k2, pool_shape, dtype)
            q = jax.random.normal(k3, (batch, h, d), dtype)
            lens = jnp.full((batch,), ctx, jnp.int32)
            layer = jnp.int32(args.num_layers - 1)
            shuffled = jnp.asarray(rng.permutation(num_blocks).reshape(batch, pages), jnp.int32)
            ordered = jnp.arange(num_blocks, dtype=jnp.int32).reshape(batch, pages)
            live = 2 * batch * kvh * ctx * d * dtype.itemsize
            paged = jax.jit(
                lambda q, kp, vp, layer, bt, lens: paged_attention(
                    q, kp, vp, layer, bt, lens, gpu=gpu, interpret=args.interpret
                )
            )
            # The logical K/V of the shuffled tables, contiguous per sequence:
            # [kv_heads, batch, context, head_dim].
            k = kp[-1][:, shuffled].reshape(kvh, batch, pages * bs, d)
            v = vp[-1][:, shuffled].reshape(kvh, batch, pages * bs, d)
            outs = {}
            for impl in args.impl:
                if impl in ("paged", "paged-seq"):
                    bt = shuffled if impl == "paged" else ordered
                    fn, fargs = paged, (q, kp, vp, layer, bt, lens)
                elif impl == "xla-contiguous":
                    fn = jax.jit(_xla_contiguous)
                    fargs = (q, k.swapaxes(0, 1), v.swapaxes(0, 1), lens)
                else:
                    from jax.experimental.pallas.ops.gpu import decode_attention

                    splits = _jax_k_splits(pages * bs)
                    if splits is None:
                        print(f"jax-contiguous: no valid k_splits for {pages * bs}")
                        continue
                    fn = jax.jit(
                        lambda q, k, v, lens: decode_attention.gqa(
                            q, k, v, kv_seq_len=lens, k_splits=splits, interpret=args.interpret
                        )
                    )
                    fargs = (q, k.transpose(1, 2, 0, 3), v.transpose(1, 2, 0, 3), lens)
                t, outs[impl] = _time(fn, fargs, args.warmup, args.iters)
                rows.append(
                    dict(impl=impl, batch=batch, context=ctx, us=t * 1e6, gbps=live / t / 1e9)
                )
                print(
                    f"{impl:15s} batch {batch:4d} context {ctx:6d} "
                    f"{t * 1e6:10.1f} us {live / t / 1e9:8.1f} GB/s",
                    flush=True,
                )
            if "paged" in outs and "xla-contiguous" in outs:
                diff = jnp.abs(
                    outs["paged"].astype(jnp.float32) - outs["xla-contiguous"].astype(jnp.float32)
                ).max()
                print(f"{'':15s} max |paged - xla-contiguous| = {float(diff):.3g}")
    return rows


def _jax_k_splits(length: int):
    """JAX's op needs length % k_splits == 0, >= 16 keys per split, and the
    split divisible by its block_k (128, or the split if shorter)."""
    for splits in (16, 8, 4, 2, 1):
        per = length // splits
        if length % splits == 0 and per >= 16 and per % min(128, per) == 0:
            return splits
    return None


def _xla_contiguous(q, k, v, lens):
    import jax
    import jax.numpy as jnp

    b, h, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, kvh, h // kvh, d)
    s = jnp.einsum("bkgd,bktd->bkgt", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    mask = jnp.arange(k.shape[2])[None, :] < lens[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgt,bktd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, h, d).astype(q.dtype)


def main(argv=None):
    args = build_parser().parse_args(argv)
    rows = run(args)
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
