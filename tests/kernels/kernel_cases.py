"""Random paged-KV cases, a naive dense NumPy attention and the sweep that the kernel
tests (`test_paged_attention.py`, `test_ragged_paged_attention.py`) share. Every case
builds pools the same adversarial way: shuffled, non-contiguous block tables, pages shared
between sequences, garbage table entries past each context, and padding rows with
context 0."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

BF16 = jnp.bfloat16
# Every context length of the issue, in one batch (context lengths are runtime
# values, so one compile covers them all), ending with a padding row.
CONTEXTS = [1, 15, 16, 17, 255, 513, 2000, 0]
# (block_size, num_kv_heads, group, head_dim, dtype, tunables): the slow sweep, every
# page size, head ratio, head dim and dtype together.
FULL = [
    (bs, kvh, g, d, dt, {})
    for bs, (kvh, g), d, dt in itertools.product(
        [8, 16, 32], [(2, 1), (2, 3), (1, 8)], [64, 128], [jnp.float32, jnp.float16, BF16]
    )
] + [
    # The largest page sizes the kernels support (tables are then short).
    (64, 2, 3, 128, BF16, {}),
    (128, 1, 8, 64, jnp.float16, {}),
]

TOLERANCE = {  # relative (to the reference's largest magnitude) bounds
    np.dtype("float32"): 1e-5,
    np.dtype("float16"): 4e-3,
    np.dtype(jnp.bfloat16): 3e-2,
}


# The default sweep's cases both kernels run; each adds the ones for its own tunables.
SHARED_DEFAULT = [
    (16, 2, 3, 64, jnp.float32, {}),
    (8, 1, 8, 128, BF16, {}),
]


def sweep(own_cases):
    """Parametrizes a kernel test over (block_size, num_kv_heads, group, head_dim, dtype,
    tunables): SHARED_DEFAULT and the kernel's `own_cases`, then FULL marked slow
    (`pytest -m slow`)."""
    cases = SHARED_DEFAULT + list(own_cases) + \
        [pytest.param(*case, marks=pytest.mark.slow) for case in FULL]
    return pytest.mark.parametrize("bs,kvh,group,d,dtype,tun", cases)


def random_paged_case(
    rng: np.random.Generator,
    *,
    context_lens,
    block_size: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype,
    query_lens=None,
    num_pad_tokens: int = 0,
    num_layers: int = 2,
    share: bool = True,
    pages_per_seq: int | None = None,
    num_blocks: int | None = None,
):
    """A pool `[layers, kv_heads, blocks, block_size, head_dim]` and the block
    tables of `context_lens`. Decode if `query_lens` is None (q `[seqs, heads,
    d]`), else ragged (q `[sum(query_lens) + num_pad_tokens, heads, d]` and
    `query_start_loc`). Sequence b > 0 shares its first pages with sequence
    b - 1 when `share` (like a prefix-cache hit / parallel samples)."""
    ctx = np.asarray(context_lens, np.int32)
    pages = [-(-int(c) // block_size) for c in ctx]
    max_pages = pages_per_seq or max(1, max(pages))
    # A fixed num_blocks keeps shapes (and so compiles) equal across cases.
    num_blocks = num_blocks or sum(pages) + 3
    assert num_blocks >= sum(pages)
    free = list(rng.permutation(num_blocks))  # shuffled: non-contiguous pages
    # Entries past a context are garbage, -1 included.
    tables = rng.integers(-1, num_blocks, (len(ctx), max_pages)).astype(np.int32)
    for b, n in enumerate(pages):
        shared = 0
        if share and b > 0 and pages[b - 1] > 1 and n > 1:
            # Share all but the last page (the one a sequence still writes into).
            shared = min(pages[b - 1], n) - 1
            tables[b, :shared] = tables[b - 1, :shared]
        for p in range(shared, n):
            tables[b, p] = free.pop()
    shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    num_heads = num_kv_heads * group
    case = dict(
        k_pages=k_pages,
        v_pages=v_pages,
        layer=jnp.int32(num_layers - 1),
        block_tables=jnp.asarray(tables),
        context_lens=jnp.asarray(ctx),
    )
    if query_lens is None:
        case["q"] = jnp.asarray(rng.standard_normal((len(ctx), num_heads, head_dim)), dtype)
    else:
        qlen = np.asarray(query_lens, np.int32)
        assert (qlen <= ctx).all(), "queries are the last tokens of the context"
        qsl = np.concatenate([[0], np.cumsum(qlen)]).astype(np.int32)
        num_tokens = int(qsl[-1]) + num_pad_tokens
        case["q"] = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype)
        case["query_start_loc"] = jnp.asarray(qsl)
    return case


def dense_attention_numpy(
    q, k_pages, v_pages, layer, block_tables, context_lens, query_start_loc=None, scale=None
):
    """Naive float64 attention, one sequence and one head at a time, over the
    contiguous K/V rebuilt page by page from the block table."""
    q = np.asarray(q, np.float64)
    kp = np.asarray(k_pages, np.float64)[int(layer)]
    vp = np.asarray(v_pages, np.float64)[int(layer)]
    tables, ctx = np.asarray(block_tables), np.asarray(context_lens)
    num_kv_heads, _, block_size, head_dim = kp.shape
    group = q.shape[1] // num_kv_heads
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    out = np.zeros_like(q)
    for b, c in enumerate(ctx):
        if query_start_loc is None:
            rows, positions = [b], [c - 1]
        else:
            qs, qe = int(query_start_loc[b]), int(query_start_loc[b + 1])
            rows = range(qs, qe)
            positions = [c - (qe - qs) + i for i in range(qe - qs)]
        for kvh in range(num_kv_heads):
            k = (
                np.concatenate(
                    [kp[kvh, tables[b, t // block_size], t % block_size][None] for t in range(c)]
                )
                if c
                else None
            )
            v = (
                np.concatenate(
                    [vp[kvh, tables[b, t // block_size], t % block_size][None] for t in range(c)]
                )
                if c
                else None
            )
            for row, pos in zip(rows, positions):
                if c == 0:
                    continue
                for g in range(group):
                    h = kvh * group + g
                    s = (k[: pos + 1] @ q[row, h]) * scale
                    w = np.exp(s - s.max())
                    out[row, h] = (w / w.sum()) @ v[: pos + 1]
    return out


def assert_close(out, ref, dtype, what=""):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), f"{what}: non-finite output"
    tol = TOLERANCE[np.dtype(dtype)]
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def sweep_case(seed, bs, kvh, group, d, dtype, contexts=CONTEXTS, queries=None, pad_tokens=0):
    """`random_paged_case` for one point of a sweep: decode when `queries` is None."""
    return random_paged_case(
        np.random.default_rng(seed),
        context_lens=contexts,
        query_lens=queries,
        num_pad_tokens=pad_tokens,
        block_size=bs,
        num_kv_heads=kvh,
        group=group,
        head_dim=d,
        dtype=dtype,
    )


def layout_case(seed, contexts, share, num_blocks, queries=None, pad_tokens=0):
    """A case of the property tests: fixed shapes (one compile: 8-token pages, 2 KV heads
    x 2 query heads, head_dim 64, float32, 8 pages per table), random runtime data."""
    return random_paged_case(
        np.random.default_rng(seed),
        context_lens=contexts,
        query_lens=queries,
        num_pad_tokens=pad_tokens,
        block_size=8,
        num_kv_heads=2,
        group=2,
        head_dim=64,
        dtype=jnp.float32,
        share=share,
        pages_per_seq=8,
        num_blocks=num_blocks,
    )


def check_kernel(kernel, reference, bs, kvh, group, d, dtype, tun, *, pad_rows, **case_args):
    """`kernel` (interpret mode, tunables `tun`) against `reference` on the sweep case of
    these shapes: same dtype and shape as q, close to the reference, and its last
    `pad_rows` rows (padding) exactly zero."""
    c = sweep_case(bs * 1000 + kvh * 100 + group * 10 + d, bs, kvh, group, d, dtype, **case_args)
    out = kernel(**c, interpret=True, **tun)
    ref = reference(**c)
    assert out.dtype == c["q"].dtype and out.shape == c["q"].shape
    assert_close(out, ref, dtype, f"bs={bs} kvh={kvh} g={group} d={d}")
    assert not np.asarray(out[-pad_rows:], np.float32).any()
