"""The jitted whole-block operations (copy-on-write copies, swap out, swap in) on both pool
layouts: sources read before any write, untouched blocks unchanged."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.runner.block_ops import HostKVPool, copy_blocks, gather_blocks, scatter_blocks


@pytest.mark.parametrize("axis", [1, 2])  # xla/reference layout, pallas layout
def test_block_copy_gather_scatter(axis):
    rng = np.random.default_rng(0)
    shape = [3, 4, 4, 5, 6]
    shape[axis] = 10  # ten blocks
    pools = tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    take = lambda a, idx: np.take(a, idx, axis=axis)  # noqa: E731
    out = copy_blocks(tuple(jnp.asarray(p) for p in pools), [1, 2, 7], [2, 9, 1], axis)
    for got, p in zip(out, pools):  # sources read before any write: 2 gets old 1, 9 old 2, 1 old 7
        want = p.copy()
        idx = [slice(None)] * 5
        for s, d in [(1, 2), (2, 9), (7, 1)]:
            idx[axis] = d
            want[tuple(idx)] = take(p, s)
        np.testing.assert_array_equal(np.asarray(got), want)
    host = HostKVPool(out, 6, axis)
    k, v = gather_blocks(out, [9, 0, 3], axis)
    host.store([5, 0, 2], (k, v))
    befores = [np.asarray(o) for o in out]  # `out` is donated to the scatter
    back = scatter_blocks(out, [4, 6, 8], host.load([5, 0, 2]), axis)
    for got, before in zip(back, befores):
        np.testing.assert_array_equal(take(np.asarray(got), [4, 6, 8]), take(before, [9, 0, 3]))
        np.testing.assert_array_equal(take(np.asarray(got), [0, 1, 2, 3, 5, 7, 9]),
                                      take(before, [0, 1, 2, 3, 5, 7, 9]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_copy_and_swap_in_are_in_place(dtype):
    """Copy-on-write copies and swap-ins on a donated pool need no pool-sized temporary,
    bfloat16 included (XLA's CPU scatter would copy that pool through float32)."""
    import jax
    from jpaged.runner import block_ops
    sd, shape = jax.ShapeDtypeStruct, (4, 512, 8, 16, 128)
    pool = (sd(shape, dtype), sd(shape, dtype))
    ids, count = sd((8,), jnp.int32), sd((), jnp.int32)
    values = (sd((4, 8, 8, 16, 128), dtype),) * 2
    pool_bytes = np.prod(shape) * jnp.dtype(dtype).itemsize
    for compiled in (block_ops._copy.trace(pool, ids, ids, count, axis=1).lower().compile(),
                     block_ops._scatter.trace(pool, ids, values, count, axis=1).lower().compile()):
        assert compiled.memory_analysis().temp_size_in_bytes < pool_bytes // 8


def test_swaps_go_in_chunks_that_warm_up_compiles_ahead():
    """A swap of more blocks than `SWAP_CHUNK` goes in chunks, each of a length `warm_swaps`
    compiled: the swap then compiles nothing, and every block lands where it should."""
    from jpaged.runner import block_ops
    rng = np.random.default_rng(1)
    axis, shape = 1, [2, 300, 2, 3, 4]
    pool = tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    before = [np.asarray(p) for p in pool]
    pool = block_ops.warm_swaps(pool, 200, axis)
    for got, want in zip(pool, before):  # warm-up writes nothing
        np.testing.assert_array_equal(np.asarray(got), want)
    sizes = (block_ops._gather._cache_size(), block_ops._scatter._cache_size())
    src = rng.permutation(300)[:150]  # 64 + 64 + 22 blocks
    dst = rng.permutation(300)[:150]
    values = gather_blocks(pool, src.tolist(), axis)
    pool = scatter_blocks(pool, dst.tolist(), values, axis)
    assert (block_ops._gather._cache_size(), block_ops._scatter._cache_size()) == sizes
    for got, old in zip(pool, before):
        got = np.asarray(got)
        np.testing.assert_array_equal(np.take(got, dst, axis=axis), np.take(old, src, axis=axis))
        rest = np.setdiff1d(np.arange(300), dst)
        np.testing.assert_array_equal(np.take(got, rest, axis=axis), np.take(old, rest, axis=axis))
