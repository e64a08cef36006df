"""What the paged attention wrappers share before their `pallas_call`: the shape checks
(Triton tensor shapes are powers of two), block tables made safe to gather from, the GQA
group of query heads laid out as the rows of a q tile, the layer as a kernel input, and
the constants of the kernels' online softmax (log2 domain)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
# Running max starts finite so that exp2(m_old - m_new) is never inf - inf;
# masked logits are -inf so they contribute exactly 0.
M_INIT = -1e30


class PagedShapes(NamedTuple):
    num_heads: int
    num_kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    block_size: int  # tokens per page
    pages_per_seq: int  # width of the block tables


def check_pow2(name: str, value: int, minimum: int = 1):
    if value < minimum or value & (value - 1):
        raise ValueError(
            f"{name}={value} must be a power of two >= {minimum} "
            "(Triton tensor shapes are powers of two)"
        )


def group_padded(group: int, minimum: int) -> int:
    """Rows of a q tile for `group` query heads: the next power of two, at least `minimum`."""
    return max(minimum, 1 << math.ceil(math.log2(group)) if group > 1 else 1)


def check_shapes(q, k_pages, v_pages, block_tables) -> PagedShapes:
    """The shapes of `q [tokens, heads, head_dim]` against pools `[layers, kv_heads, blocks,
    block_size, head_dim]` and `block_tables [seqs, pages_per_seq]`; ValueError for
    shapes the kernels cannot run."""
    _, num_heads, head_dim = q.shape
    _, num_kv_heads, _, block_size, _ = k_pages.shape
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k/v pools differ: {k_pages.shape} vs {v_pages.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads=} is not a multiple of {num_kv_heads=}")
    check_pow2("block_size", block_size)
    check_pow2("head_dim", head_dim, 16)
    return PagedShapes(num_heads, num_kv_heads, num_heads // num_kv_heads, head_dim, block_size,
                       block_tables.shape[1])


def softmax_scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def safe_block_tables(block_tables, num_blocks: int, padded_pages: int):
    """int32 block tables `[seqs, padded_pages]` whose every entry is a block of the pool.
    Entries past a context are still loaded (then masked): clamping them means garbage such
    as -1 never addresses memory outside the pool. The padding (small, int32) keeps every
    slice of whole compute blocks the kernel reads in range."""
    pages_per_seq = block_tables.shape[1]
    block_tables = jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1)
    return jnp.pad(block_tables, ((0, 0), (0, padded_pages - pages_per_seq)))


def group_queries(q, num_kv_heads: int, padded_group: int):
    """`q [tokens, heads, head_dim]` -> `[tokens, kv_heads, padded_group, head_dim]`: the
    query heads of one KV head become the rows of one q tile (each K/V page is then read
    once per KV head, not once per query head), zero rows up to `padded_group`."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if padded_group != group:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))
    return q4


def layer_array(layer):
    """The layer (an int, or a traced int32 scalar) as the one-element array the kernel
    reads: the pool stays whole, no per-layer slice of it is materialized."""
    return jnp.asarray(layer, jnp.int32).reshape(1)


def whole(x) -> pl.BlockSpec:
    """A BlockSpec that hands every program all of `x`."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
