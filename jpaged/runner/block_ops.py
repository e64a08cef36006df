"""Whole-block operations on the KV pool: copy-on-write copies, swap out, swap in
(docs/design.md, "Copy-on-write and beam search" and "Swapping").

Each is one small jitted gather and a loop of block writes along the backend's
`block_axis`, on both pools at once, with the pool donated (updated in place, float32 and
bfloat16 alike). Block lists are padded to power-of-two lengths (at least 8), so only a
handful of variants ever compile; the loop stops at the real count. Swaps go in chunks of
at most `SWAP_CHUNK` blocks, so their variants are four (8 to 64) and warm up at start-up
(`warm_swaps`), whatever a request group holds.

`HostKVPool` is the swap space: numpy arrays in the device pool's layout with
`num_host_blocks` blocks, allocated lazily by the OS (zero pages until written).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.utils import next_power_of_2


def _index(axis: int, idx):
    return (slice(None),) * axis + (idx,)


def _put_blocks(p, blocks, dst, count, axis: int):
    """p with block dst[i] := blocks[i] along `axis`, for i < count: one dynamic-update-slice
    per block in a loop, in place on the donated pool. (A scatter would do it in one op, but
    XLA's CPU scatter into a bfloat16 pool goes through a float32 copy of the whole pool.)"""
    def body(i, p):
        return jax.lax.dynamic_update_slice_in_dim(
            p, jax.lax.dynamic_slice_in_dim(blocks, i, 1, axis).astype(p.dtype), dst[i], axis)
    return jax.lax.fori_loop(0, count, body, p)


@functools.partial(jax.jit, static_argnames=("axis",), donate_argnums=(0,))
def _copy(pool, src, dst, count, axis: int):
    # Every source is gathered before any destination is written.
    return tuple(_put_blocks(p, jnp.take(p, src, axis=axis), dst, count, axis) for p in pool)


@functools.partial(jax.jit, static_argnames=("axis",))
def _gather(pool, blocks, axis: int):
    return tuple(jnp.take(p, blocks, axis=axis) for p in pool)


@functools.partial(jax.jit, static_argnames=("axis",), donate_argnums=(0,))
def _scatter(pool, blocks, values, count, axis: int):
    return tuple(_put_blocks(p, v, blocks, count, axis) for p, v in zip(pool, values))


SWAP_CHUNK = 64  # blocks per swap call: a 64-block chunk of SmolLM2-135M float32 is 47 MB


def _chunks(n: int) -> list[slice]:
    return [slice(i, min(n, i + SWAP_CHUNK)) for i in range(0, n, SWAP_CHUNK)] or [slice(0, 0)]


def padded(ids, fill: int) -> np.ndarray:
    out = np.full(next_power_of_2(len(ids), 8), fill, np.int32)
    out[:len(ids)] = ids
    return out


def copy_blocks(pool, src, dst, axis: int):
    """pool with block dst[i] := block src[i] (all reads before writes)."""
    return _copy(pool, padded(src, 0), padded(dst, 0), np.int32(len(dst)), axis=axis)


def warm_copies(pool, max_pairs: int, axis: int):
    """Compile `copy_blocks` for every padded length up to `max_pairs` (a step copies at most
    one block per sequence) by running each with a count of 0, which writes nothing."""
    for n in sorted({next_power_of_2(k, 8) for k in range(1, max_pairs + 1)}):
        ids = np.zeros(n, np.int32)
        pool = _copy(pool, ids, ids, np.int32(0), axis=axis)
    return pool


def gather_blocks(pool, blocks, axis: int) -> tuple[np.ndarray, ...]:
    """Host (numpy) copies of `blocks` of each pool, in order."""
    parts = []
    for c in _chunks(len(blocks)):
        out = jax.device_get(_gather(pool, padded(blocks[c], 0), axis=axis))
        parts.append(tuple(np.asarray(o)[_index(axis, slice(0, c.stop - c.start))] for o in out))
    return tuple(np.concatenate(p, axis=axis) for p in zip(*parts))


def scatter_blocks(pool, blocks, values, axis: int):
    """pool with `blocks` overwritten by host arrays `values` (one per pool)."""
    for c in _chunks(len(blocks)):
        n = c.stop - c.start
        bufs = []
        for v in values:
            shape = list(v.shape)
            shape[axis] = next_power_of_2(n, 8)
            buf = np.zeros(shape, v.dtype)
            buf[_index(axis, slice(0, n))] = v[_index(axis, c)]
            bufs.append(buf)
        pool = _scatter(pool, padded(blocks[c], 0), tuple(bufs), np.int32(n), axis=axis)
    return pool


def warm_swaps(pool, max_blocks: int, axis: int):
    """Compile the swap gather and scatter for every chunk length a swap of up to
    `max_blocks` blocks uses, by running each (the scatter with a count of 0: it writes
    nothing)."""
    shape = list(pool[0].shape)
    for n in sorted({next_power_of_2(k, 8) for k in range(1, min(max_blocks, SWAP_CHUNK) + 1)}):
        ids = np.zeros(n, np.int32)
        jax.block_until_ready(_gather(pool, ids, axis=axis))
        shape[axis] = n
        values = tuple(np.zeros(shape, p.dtype) for p in pool)
        pool = _scatter(pool, ids, values, np.int32(0), axis=axis)
    return pool


class HostKVPool:
    """Swap space in host memory, in the device pool's layout (K and V)."""

    def __init__(self, device_pool, num_blocks: int, axis: int):
        self.axis = axis
        self.num_blocks = num_blocks
        self._shape = list(device_pool[0].shape)
        self._shape[axis] = num_blocks
        self._dtype = np.dtype(device_pool[0].dtype)
        self.arrays: tuple[np.ndarray, ...] | None = None

    def store(self, host_blocks, values) -> None:
        if self.arrays is None:
            self.arrays = tuple(np.zeros(self._shape, self._dtype) for _ in range(2))
        idx = _index(self.axis, np.asarray(host_blocks, np.int64))
        for arr, v in zip(self.arrays, values):
            arr[idx] = v

    def load(self, host_blocks) -> tuple[np.ndarray, ...]:
        idx = _index(self.axis, np.asarray(host_blocks, np.int64))
        return tuple(arr[idx] for arr in self.arrays)
