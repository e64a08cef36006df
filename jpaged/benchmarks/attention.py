"""`jpaged bench attention`: paged against contiguous decode attention (the paper's Fig. 18a).

One query token per sequence, every sequence at the same context length, the default
model's attention shapes (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64). Each point
times, on this CPU, three calls over the same K/V values:

- paged: the C++ kernel (`attention/cpu.py`) through block tables whose physical blocks are
  shuffled over the pool, as the engine's are after a while;
- contiguous: the same kernel over a pool where each sequence's blocks lie in order, one
  after another (an identity block table): what the block-table indirection costs;
- dense: jitted jnp (XLA) attention over K/V stored as one [batch, context, kv_heads,
  head_dim] array: a contiguous KV cache with no kernel of ours at all.

Latency is the median per call in microseconds, the three timed in turn so that a shared
machine slows them alike. For A100 and H100 each point also gets the memory-bound estimate
(bytes read / HBM bandwidth): the paged kernel reads whole blocks and the block table. The
paper measured vLLM's paged kernel 20-26% slower than FasterTransformer's contiguous one.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Any

DESCRIPTION = __doc__.split("\n\n", 1)[1]

SHAPES = dict(heads=9, kv_heads=3, head_dim=64)  # SmolLM2-135M's attention
FULL = dict(batch_sizes=(1, 8, 32, 64), context_lens=(64, 128, 256, 512, 1024, 2048))
# Context lengths that end inside a block, a few small batches: under a minute with compiles.
QUICK = dict(batch_sizes=(1, 4), context_lens=(33, 200), iters=3)
GPUS = ("a100", "h100")


def _median_us(fns, iters: int) -> list[float]:
    """Median microseconds of each fn over `iters` rounds that call each once (after a warm
    call each: compiles stay out). The order rotates every round: the first call of a round
    measured slower (caches and threads left by the call before)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for i in range(iters):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e6 for t in times]


def dense_attention(q, k, v, scale: float):
    """q [B, heads, D], k and v [B, T, kv_heads, D] -> f32 [B, heads, D]: every key visible."""
    import jax
    import jax.numpy as jnp
    B, H, D = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, KV, H // KV, D).astype(jnp.float32) * scale
    # float32 operands: XLA's CPU dots on bfloat16 are slower than the upcast (see xla.py).
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k.astype(jnp.float32))
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bkgt,btkd->bkgd", p, v.astype(jnp.float32)).reshape(B, H, D)


def _pools(k, v, block_size: int, perm):
    """Dense k, v [B, T, KV, D] -> K and V pools [1, blocks, KV, block_size, D] in the cpu
    backend's layout (K transposed inside a block), logical block j at physical perm[j]."""
    import jax.numpy as jnp
    B, T, KV, D = k.shape
    pages = T // block_size
    kb = k.reshape(B * pages, block_size, KV, D).transpose(0, 2, 3, 1)  # [blocks, KV, D, bs]
    vb = v.reshape(B * pages, block_size, KV, D).transpose(0, 2, 1, 3)  # [blocks, KV, bs, D]
    where = jnp.argsort(jnp.asarray(perm))  # physical block p holds logical block where[p]
    shape = (1, B * pages, KV, block_size, D)
    return kb[where].reshape(shape), vb[where].reshape(shape)


def roofline_us(gpu: str, batch: int, context: int, block_size: int, itemsize: int,
                paged: bool) -> float:
    """Microseconds a memory-bound decode attention needs on `gpu`: K/V (whole blocks when
    paged), q in, out, and for the paged one its block tables and context lengths."""
    from jpaged.pallas_kernels.gpus import GPUS as TABLE
    from jpaged.utils import cdiv
    H, KV, D = SHAPES["heads"], SHAPES["kv_heads"], SHAPES["head_dim"]
    pages = cdiv(context, block_size)
    tokens = pages * block_size if paged else context
    nbytes = batch * (2 * tokens * KV * D + 2 * H * D) * itemsize
    if paged:
        nbytes += batch * (pages + 1) * 4  # int32 block table row and context length
    return nbytes / TABLE[gpu].bandwidth * 1e6


def _point(dtype: str, block_size: int, batch: int, context: int, iters: int, rng) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpaged.attention import cpu
    from jpaged.utils import cdiv
    H, KV, D = SHAPES["heads"], SHAPES["kv_heads"], SHAPES["head_dim"]
    pages = cdiv(context, block_size)
    T = pages * block_size
    k = jnp.asarray(rng.standard_normal((batch, T, KV, D), np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((batch, T, KV, D), np.float32), dtype)
    q = jnp.asarray(rng.standard_normal((batch, H, D), np.float32))
    identity = np.arange(batch * pages, dtype=np.int32)
    shuffled = rng.permutation(batch * pages).astype(np.int32)
    lens = jnp.full(batch, context, jnp.int32)
    starts = jnp.arange(batch + 1, dtype=jnp.int32)
    scale = D ** -0.5
    kernel = jax.jit(lambda q, kp, vp, tables: cpu.paged_attention(q, kp, vp, 0, tables, lens, starts, scale))
    args = {}
    for name, perm in (("paged", shuffled), ("contiguous", identity)):
        kp, vp = _pools(k, v, block_size, perm)
        args[name] = (q, kp, vp, jnp.asarray(perm.reshape(batch, pages)))
    dense = jax.jit(dense_attention, static_argnums=3)
    k_ctx, v_ctx = k[:, :context], v[:, :context]  # the dense cache holds exactly the context
    calls = [lambda: kernel(*args["paged"]).block_until_ready(),
             lambda: kernel(*args["contiguous"]).block_until_ready(),
             lambda: dense(q, k_ctx, v_ctx, scale).block_until_ready()]
    paged_us, contiguous_us, dense_us = _median_us(calls, iters)
    out = {name: np.asarray(kernel(*a)) for name, a in args.items()}
    out["dense"] = np.asarray(dense(q, k_ctx, v_ctx, scale))
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * batch * context * KV * D * itemsize
    roof = {}
    for gpu in GPUS:
        p, c = (roofline_us(gpu, batch, context, block_size, itemsize, paged) for paged in (True, False))
        roof[gpu] = {"paged_us": p, "contiguous_us": c, "paged_over_contiguous": p / c}
    return {"dtype": dtype, "block_size": block_size, "batch_size": batch, "context_len": context,
            "kv_bytes": kv_bytes, "paged_us": paged_us, "contiguous_us": contiguous_us,
            "dense_xla_us": dense_us, "paged_over_contiguous": paged_us / contiguous_us,
            "paged_over_dense_xla": paged_us / dense_us, "paged_gbs": kv_bytes / paged_us / 1e3,
            "max_abs_diff_contiguous": float(np.abs(out["paged"] - out["contiguous"]).max()),
            "max_abs_diff_dense": float(np.abs(out["paged"] - out["dense"]).max()),
            "roofline": roof}


def attention_benchmark(*, batch_sizes=FULL["batch_sizes"], context_lens=FULL["context_lens"],
                        dtypes=("float32", "bfloat16"), block_sizes=(16,), iters: int = 20,
                        seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Every (dtype, block size, batch, context) point; see the module docstring."""
    import jax
    import numpy as np

    from jpaged.attention import cpu
    if (reason := cpu.available()) is not None:
        raise RuntimeError(f"the C++ attention kernel does not build here: {reason}")
    bad = [b for b in block_sizes if not cpu.supported(b, SHAPES["head_dim"])]
    if bad:
        raise ValueError(f"block_sizes: the kernel does not take {bad}")
    rng = np.random.default_rng(seed)
    points = []
    for dtype in dtypes:
        for bs in block_sizes:
            for B in batch_sizes:
                for ctx in context_lens:
                    points.append(_point(dtype, bs, B, ctx, iters, rng))
                    if not quiet:
                        p = points[-1]
                        print(f"{dtype} block {bs} batch {B} context {ctx}: paged {p['paged_us']:.0f} us, "
                              f"contiguous {p['contiguous_us']:.0f} us, dense {p['dense_xla_us']:.0f} us",
                              flush=True)
    ratios = [p["paged_over_contiguous"] for p in points]
    return {**SHAPES, "iters": iters, "device": jax.devices()[0].device_kind,
            "paged_over_contiguous": {"median": statistics.median(ratios), "min": min(ratios),
                                      "max": max(ratios)},
            "paper": "vLLM's paged kernel 20-26% slower than FasterTransformer's (Fig. 18a)",
            "points": points}


def format_table(result: dict[str, Any]) -> str:
    r = result["paged_over_contiguous"]
    lines = [f"decode attention, {result['heads']} heads / {result['kv_heads']} KV heads of "
             f"{result['head_dim']}; paged / contiguous kernel: median {r['median']:.3f} "
             f"({r['min']:.3f}-{r['max']:.3f}); {result['paper']}",
             "| dtype | block | batch | context | paged us | contiguous us | dense XLA us | "
             "paged / contiguous | paged / dense | A100 paged / contiguous us | H100 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        a, h = p["roofline"]["a100"], p["roofline"]["h100"]
        lines.append(f"| {p['dtype']} | {p['block_size']} | {p['batch_size']} | {p['context_len']} | "
                     f"{p['paged_us']:.0f} | {p['contiguous_us']:.0f} | {p['dense_xla_us']:.0f} | "
                     f"{p['paged_over_contiguous']:.3f} | {p['paged_over_dense_xla']:.3f} | "
                     f"{a['paged_us']:.2f} / {a['contiguous_us']:.2f} | "
                     f"{h['paged_us']:.2f} / {h['contiguous_us']:.2f} |")
    return "\n".join(lines)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be positive integers, got {text!r}")
    return values


def add_cli_args(parser) -> None:
    parser.add_argument("--batch-sizes", default=",".join(map(str, FULL["batch_sizes"])),
                        help="sequences per call, comma-separated [default: %(default)s]")
    parser.add_argument("--context-lens", default=",".join(map(str, FULL["context_lens"])),
                        help="tokens per sequence, comma-separated [default: %(default)s]")
    parser.add_argument("--block-sizes", default="16",
                        help="tokens per KV block, comma-separated [default: 16]")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"], help="KV cache dtypes [default: both]")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per point [default: 20]")
    parser.add_argument("--quick", action="store_true",
                        help=f"a few points for CI: batches {QUICK['batch_sizes']}, contexts "
                             f"{QUICK['context_lens']}, {QUICK['iters']} calls each (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--output", metavar="FILE.json", default=None, help="also write the JSON here")


def main(args) -> int:
    sweep = dict(batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
                 context_lens=_ints(args.context_lens, "--context-lens"), iters=args.iters)
    if args.quick:
        sweep = dict(QUICK)
    result = attention_benchmark(**sweep, dtypes=tuple(args.dtypes),
                                 block_sizes=_ints(args.block_sizes, "--block-sizes"),
                                 quiet=args.json)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2) if args.json else format_table(result), flush=True)
    return 0
