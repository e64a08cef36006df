"""Paged attention as a library: `PagedKVCache`, a pytree of the K/V pools of every layer,
the block tables and the context lengths, for a decoder of your own under `jax.jit`
(docs/design.md, "Paged attention as a library").

Blocks are handed out on the host (`allocate`, `free`: a free list read off the block
tables); writing and attending run on the device through the engine's own backends.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.utils import cdiv

from .backend import AttentionBackend
from .metadata import AttentionMetadata, num_tiles
from .selector import get_backend

QUERY_TILE = 32  # queries per tile of a ragged step, as the engine's prefill tiles


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k_pool", "v_pool", "block_tables", "context_lens"],
                   meta_fields=["block_size", "backend"])
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """The KV cache of a batch of up to `max_seqs` sequences, in pages of `block_size` tokens.

    Arrays (the pytree's leaves):
      k_pool, v_pool: the pools of all layers, in `backend`'s layout (`backend.pool_shape`):
        cpu / xla / reference: [layers, blocks, kv_heads, block_size, head_dim] (K stored
        transposed inside each block: write it with `write`, never by hand);
        pallas: [layers, kv_heads, blocks, block_size, head_dim].
      block_tables: i32[max_seqs, max_blocks_per_seq]: row b lists sequence b's blocks in
        token order; -1 = no block yet.
      context_lens: i32[max_seqs]: tokens of each sequence whose K/V the pools hold.
    Static (part of the treedef: jit specializes on them): block_size, backend.

    A step: `allocate` blocks on the host, then under jit `append` (-> the step's
    `AttentionMetadata`), and in every layer `write` the new tokens' K/V, then `attend`.
    """
    k_pool: jax.Array
    v_pool: jax.Array
    block_tables: jax.Array
    context_lens: jax.Array
    block_size: int
    backend: AttentionBackend

    @classmethod
    def create(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
               head_dim: int, max_seqs: int, max_blocks_per_seq: int, dtype=jnp.float32,
               backend: str = "auto") -> "PagedKVCache":
        """Zeroed pools and empty tables. `backend`: "cpu" (the C++ kernel; KernelBuildError
        if it does not build here), "xla" (plain jnp, paged), "reference" (plain jnp,
        obvious), "pallas" (NVIDIA GPU), "pallas-interpret" (the Pallas kernels in interpret
        mode, anywhere: slow), "auto" (as the engine: cpu on the CPU, falling back to xla
        without a compiler; pallas on a GPU)."""
        for name, value in [("num_layers", num_layers), ("num_blocks", num_blocks),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("max_seqs", max_seqs), ("max_blocks_per_seq", max_blocks_per_seq)]:
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two")
        if backend == "pallas" and jax.default_backend() != "gpu":
            raise ValueError("backend='pallas' needs an NVIDIA GPU (Triton); on the "
                             f"{jax.default_backend()} use 'pallas-interpret'")
        impl = get_backend(backend)
        shape = impl.pool_shape(num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.full((max_seqs, max_blocks_per_seq), -1, jnp.int32),
                   jnp.zeros(max_seqs, jnp.int32), block_size, impl)

    num_layers = property(lambda self: self.k_pool.shape[0])
    num_blocks = property(lambda self: self.k_pool.shape[self.backend.block_axis])
    num_kv_heads = property(lambda self: self.k_pool.shape[self.backend.head_axis])
    head_dim = property(lambda self: self.k_pool.shape[-1])
    max_seqs = property(lambda self: self.block_tables.shape[0])
    max_blocks_per_seq = property(lambda self: self.block_tables.shape[1])

    def __repr__(self):
        return (f"PagedKVCache(backend={self.backend.name!r}, layers={self.num_layers}, "
                f"blocks={self.num_blocks}x{self.block_size}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, max_seqs={self.max_seqs}, "
                f"max_blocks_per_seq={self.max_blocks_per_seq}, dtype={self.k_pool.dtype})")

    # ---- the host side: blocks to sequences (outside jit) ---------------------------------------

    def _host(self, what: str):
        try:
            return np.array(self.block_tables), np.array(self.context_lens)
        except jax.errors.TracerArrayConversionError:
            raise TypeError(f"PagedKVCache.{what} runs on the host, outside jax.jit") from None

    def free_blocks(self) -> np.ndarray:
        """Ids of the blocks no sequence holds, ascending (the free list)."""
        return _free_list(self._host("free_blocks")[0], self.num_blocks)

    def allocate(self, num_new_tokens, rng: np.random.Generator | None = None) -> "PagedKVCache":
        """The cache with blocks for `num_new_tokens[b]` more tokens of each sequence b
        (ints [max_seqs]; 0 = none) beyond its `context_lens[b]`. Free blocks go out lowest
        id first, or in `rng`'s random order. ValueError if a table or the pool is full."""
        tables, ctx = self._host("allocate")
        new = np.asarray(num_new_tokens, np.int64)
        if new.shape != ctx.shape or (new < 0).any():
            raise ValueError(f"num_new_tokens must be {ctx.shape[0]} counts >= 0, got {new.tolist()}")
        have = (tables >= 0).sum(1)
        need = np.maximum(cdiv(ctx + new, self.block_size), have)
        if (over := np.flatnonzero(need > self.max_blocks_per_seq)).size:
            b = int(over[0])
            raise ValueError(f"sequence {b} would hold {ctx[b] + new[b]} tokens: {need[b]} blocks, "
                             f"more than max_blocks_per_seq={self.max_blocks_per_seq}")
        free = _free_list(tables, self.num_blocks)
        if rng is not None:
            free = rng.permutation(free)
        if (need - have).sum() > free.size:
            raise ValueError(f"the pool is full: {(need - have).sum()} blocks needed, "
                             f"{free.size} free of {self.num_blocks}")
        taken = 0
        for b in np.flatnonzero(need > have):
            n = need[b] - have[b]
            tables[b, have[b]:need[b]] = free[taken:taken + n]
            taken += n
        return dataclasses.replace(self, block_tables=jnp.asarray(tables))

    def free(self, seqs) -> "PagedKVCache":
        """The cache with sequences `seqs` (row indices) emptied: their blocks go back to
        the free list, their context length to 0."""
        tables, ctx = self._host("free")
        tables[np.asarray(seqs)] = -1
        ctx[np.asarray(seqs)] = 0
        return dataclasses.replace(self, block_tables=jnp.asarray(tables),
                                   context_lens=jnp.asarray(ctx))

    # ---- the device side (jittable) ------------------------------------------------------------

    def append(self, query_lens, num_tokens: int | None = None
               ) -> tuple["PagedKVCache", AttentionMetadata]:
        """Adds `query_lens[b]` new tokens to each sequence b (i32[max_seqs]): returns the
        cache with its context lengths grown, and the step's `AttentionMetadata` that
        `write` and `attend` take (`meta.positions` [N] is each new token's position, for
        RoPE). Their blocks must be allocated first (`allocate`): a token without one is
        not stored.

        The new tokens' arrays (q, k, v, and your token ids) are packed N long:
          num_tokens=None, decode: N = max_seqs, row b holds sequence b's one new token;
            query_lens[b] > 0 marks an active row (one token), 0 an idle one (padding).
            The backends' decode kernels.
          num_tokens=N (static), ragged (prefill, chunked prefill, mixed): sequence after
            sequence, query_lens[b] tokens each, at most N in all; the rest is padding.
            Each token attends causally to its sequence's cached tokens and to the new
            ones before it.
        """
        query_lens = jnp.asarray(query_lens, jnp.int32)
        if query_lens.shape != self.context_lens.shape:
            raise ValueError(f"query_lens must have shape {self.context_lens.shape}, "
                             f"got {query_lens.shape}")
        if num_tokens is None:
            query_lens = (query_lens > 0).astype(jnp.int32)  # one token per active row
            meta = decode_metadata(self.block_tables, self.context_lens, query_lens > 0,
                                   self.block_size)
        else:
            meta = ragged_metadata(self.block_tables, self.context_lens, query_lens,
                                   num_tokens, self.block_size)
        return dataclasses.replace(self, context_lens=self.context_lens + query_lens), meta

    def write(self, layer, k, v, meta: AttentionMetadata) -> "PagedKVCache":
        """The cache with k, v [N, kv_heads, head_dim] (the step's new tokens, packed as
        `append` says) stored in layer `layer` (an int, or a traced int32 scalar under
        `lax.scan`) at `meta.slot_mapping`; padding is dropped. Write a layer's K/V before
        it attends: its tokens see themselves. Under jit with the cache donated, the
        pools are updated in place."""
        k_pool, v_pool = self.backend.write(self.k_pool, self.v_pool, layer, k, v, meta.slot_mapping)
        return dataclasses.replace(self, k_pool=k_pool, v_pool=v_pool)

    def attend(self, layer, q, meta: AttentionMetadata, scale: float | None = None) -> jax.Array:
        """q [N, heads, head_dim] (heads a multiple of kv_heads: GQA) -> [N, heads, head_dim]
        in q's dtype: each new token's causal attention over its sequence's K/V in layer
        `layer`, softmax(q k^T * scale) v with `scale` 1/sqrt(head_dim) by default;
        padding rows give zeros."""
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out = self.backend.attend(q, self.k_pool, self.v_pool, layer, meta, scale)
        N = q.shape[0]
        if meta.query_grid.shape[1] == 1:  # decode: row b is sequence b
            real = meta.context_lens > 0
        else:
            real = jnp.arange(N) < meta.query_start_loc[-1]
        return jnp.where(real[:, None, None], out, 0).astype(q.dtype)


def _free_list(tables: np.ndarray, num_blocks: int) -> np.ndarray:
    used = np.zeros(num_blocks, bool)
    used[tables[tables >= 0]] = True
    return np.flatnonzero(~used)


def _slots(block_tables, seq, pos, block_size: int):
    """Pool slot (block * block_size + offset) of position `pos` of sequence `seq`; -1 where
    the sequence has no block there (dropped by every backend's write)."""
    page = pos // block_size
    P = block_tables.shape[1]
    block = block_tables[seq, jnp.clip(page, 0, P - 1)]
    ok = (page < P) & (block >= 0)
    return jnp.where(ok, block * block_size + pos % block_size, -1)


def decode_metadata(block_tables, context_lens, active, block_size: int) -> AttentionMetadata:
    """One new token for each `active` sequence b (bool[B]) at row b, position
    context_lens[b] (the tokens cached before it). Idle rows: no slot, context 0."""
    B = block_tables.shape[0]
    rows = jnp.arange(B, dtype=jnp.int32)
    slot = jnp.where(active, _slots(block_tables, rows, context_lens, block_size), -1)
    return AttentionMetadata(
        slot_mapping=slot.astype(jnp.int32),
        block_tables=jnp.maximum(block_tables, 0),  # kernels read only pages in use; no -1
        context_lens=jnp.where(active, context_lens + 1, 0).astype(jnp.int32),
        query_start_loc=jnp.arange(B + 1, dtype=jnp.int32),
        query_grid=jnp.where(active, rows, B)[:, None],
        grid_index=rows, tile_seq=rows,
        positions=jnp.where(active, context_lens, 0).astype(jnp.int32))


def ragged_metadata(block_tables, context_lens, query_lens, num_tokens: int,
                    block_size: int) -> AttentionMetadata:
    """query_lens[b] new tokens of each sequence b, packed sequence after sequence into
    `num_tokens` rows (static), cut into query tiles of at most QUERY_TILE tokens of one
    sequence (`metadata.py`); rows past the last token are padding."""
    B = block_tables.shape[0]
    N = num_tokens
    Q = max(2, min(QUERY_TILE, N))  # Q = 1 is how backends recognise a decode step
    R = num_tiles(N, B, Q)
    query_start_loc = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(query_lens)]).astype(jnp.int32)
    t = jnp.arange(N, dtype=jnp.int32)
    real = t < query_start_loc[-1]
    # The last sequence starting at or before t owns it (empty sequences start where the next does).
    seq = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, B - 1)
    rel = t - query_start_loc[seq]
    pos = context_lens[seq] + rel
    slot = jnp.where(real, _slots(block_tables, seq, pos, block_size), -1)
    tiles = (query_lens + Q - 1) // Q
    tile_end = jnp.cumsum(tiles)
    tile_begin = tile_end - tiles
    r = jnp.arange(R, dtype=jnp.int32)
    tile_seq = jnp.clip(jnp.searchsorted(tile_end, r, side="right"), 0, B - 1).astype(jnp.int32)
    first = (r - tile_begin[tile_seq]) * Q  # first query of tile r within its sequence
    count = jnp.where(r < tile_end[-1], jnp.clip(query_lens[tile_seq] - first, 0, Q), 0)
    j = jnp.arange(Q, dtype=jnp.int32)
    query_grid = jnp.where(j[None, :] < count[:, None],
                           query_start_loc[tile_seq][:, None] + first[:, None] + j[None, :], N)
    grid_index = jnp.where(real, (tile_begin[seq] + rel // Q) * Q + rel % Q, 0)
    return AttentionMetadata(
        slot_mapping=slot.astype(jnp.int32),
        block_tables=jnp.maximum(block_tables, 0),
        context_lens=(context_lens + query_lens).astype(jnp.int32),
        query_start_loc=query_start_loc,
        query_grid=query_grid.astype(jnp.int32),
        grid_index=grid_index.astype(jnp.int32),
        tile_seq=tile_seq,
        positions=jnp.where(real, pos, 0).astype(jnp.int32))
