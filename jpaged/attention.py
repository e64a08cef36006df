"""Paged attention backends behind one interface.

A backend owns the physical layout of the KV pool (stacked over layers), writes
each step's new K/V into it at `slot_mapping`, and attends over the pages in
each sequence's block table. The model calls `write` BEFORE `attend` for each
layer, so the pool can stay in the layer scan's carry without being copied
(DESIGN.md, last section).

- `xla`: pure jnp; loops over pages with an online softmax, queries laid out on a
  [sequences, query length] grid. The CPU default.
- `reference`: per-token, the simplest correct version; used by tests.
- `pallas` / `pallas-interpret`: the kernels in `jpaged.pallas_kernels`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


class AttentionMetadata(NamedTuple):
    """Device copies of the input builder's arrays that attention needs."""
    slot_mapping: jax.Array  # i32[N]
    block_tables: jax.Array  # i32[B, P]
    context_lens: jax.Array  # i32[B]
    query_start_loc: jax.Array  # i32[B + 1]
    query_grid: jax.Array  # i32[B, Q]
    grid_index: jax.Array  # i32[N]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """Pool layout [layers, blocks, block_size, kv_heads, head_dim] (K and V alike)."""
    name: str = "xla"
    block_axis = 1  # axis of the pool that indexes blocks (copies and swaps use it)

    def pool_shape(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_layers, num_blocks, block_size, num_kv_heads, head_dim)

    def write(self, k_pool, v_pool, layer, k, v, slot_mapping):
        """Scatter new K/V [N, kv_heads, head_dim] into the pool; slot -1 is dropped."""
        _, num_blocks, block_size = k_pool.shape[:3]
        # Negative slots would wrap around: send them past the end, where mode="drop" drops them.
        slots = jnp.where(slot_mapping < 0, num_blocks * block_size, slot_mapping)
        blocks, offsets = slots // block_size, slots % block_size
        k_pool = k_pool.at[layer, blocks, offsets].set(k.astype(k_pool.dtype), mode="drop")
        v_pool = v_pool.at[layer, blocks, offsets].set(v.astype(v_pool.dtype), mode="drop")
        return k_pool, v_pool

    decode_group = 8  # decode rows per page loop (rows come sorted by context length)

    def attend(self, q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
        """q [N, heads, head_dim] -> [N, heads, head_dim]; causal over each sequence's context.

        A loop over pages with an online softmax: each iteration gathers ONE block per
        sequence (small enough to stay in cache) instead of materialising every
        sequence's whole context, which measured 3x faster on the CPU. Decode rows run
        in groups of `decode_group`, each looping only over the pages its longest
        context needs: with rows sorted by length, the work follows the tokens stored,
        not batch size x the longest context.
        """
        N, H, D = q.shape
        B, Q = meta.query_grid.shape
        KV = k_pool.shape[3]
        qg = jnp.take(q, meta.query_grid, axis=0, mode="fill", fill_value=0)  # [B, Q, H, D]
        qg = (qg.reshape(B, Q, KV, H // KV, D) * scale).astype(jnp.float32)
        q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        q_pos = (meta.context_lens - q_lens)[:, None] + jnp.arange(Q)[None, :]  # [B, Q]
        limit = jnp.minimum(q_pos, meta.context_lens[:, None] - 1)  # last key each query sees
        rows = self.decode_group if Q == 1 and B % self.decode_group == 0 else B
        o = jnp.concatenate([
            _page_loop(qg[r:r + rows], k_pool, v_pool, layer, meta.block_tables[r:r + rows],
                       meta.context_lens[r:r + rows], limit[r:r + rows])
            for r in range(0, B, rows)])
        o = o.transpose(0, 3, 1, 2, 4).reshape(B * Q, H, D)
        return o[meta.grid_index].astype(q.dtype)


def _page_loop(qg, k_pool, v_pool, layer, block_tables, context_lens, limit):
    """Online-softmax attention of qg [B, Q, KV, G, D] over the pages of each row."""
    B, Q, KV, G, D = qg.shape
    block_size = k_pool.shape[2]
    num_pages = (jnp.max(context_lens) + block_size - 1) // block_size

    def body(p, carry):
        m, l, acc = carry
        blocks = block_tables[:, p]
        # Upcast after the gather: XLA's CPU dots are slow on small bfloat16 operands.
        k = k_pool[layer, blocks].astype(jnp.float32)  # [B, block_size, KV, D]
        v = v_pool[layer, blocks].astype(jnp.float32)
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k)
        key_pos = p * block_size + jnp.arange(block_size)
        visible = key_pos[None, None, :] <= limit[:, :, None]  # [B, Q, block_size]
        s = jnp.where(visible[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isinf(m_new), 0.0, m_new)  # rows that saw nothing yet
        e = jnp.exp(s - m_safe[..., None])
        a = jnp.exp(m - m_safe)
        return m_new, l * a + e.sum(-1), acc * a[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", e, v)

    init = (jnp.full((B, KV, G, Q), -jnp.inf), jnp.zeros((B, KV, G, Q)), jnp.zeros((B, KV, G, Q, D)))
    _, l, acc = jax.lax.fori_loop(0, num_pages, body, init)
    return acc / jnp.where(l == 0, 1.0, l)[..., None]  # padding rows: zeros, not NaN


@dataclasses.dataclass(frozen=True)
class ReferenceBackend(AttentionBackend):
    """Per token: gather its sequence's whole context, mask, softmax. Slow, obvious."""
    name: str = "reference"

    def attend(self, q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
        N, H, D = q.shape
        _, _, block_size, KV, _ = k_pool.shape
        T = meta.block_tables.shape[1] * block_size
        token = jnp.arange(N)
        seq = jnp.clip(jnp.searchsorted(meta.query_start_loc, token, side="right") - 1,
                       0, meta.context_lens.shape[0] - 1)
        q_len = meta.query_start_loc[seq + 1] - meta.query_start_loc[seq]
        pos = meta.context_lens[seq] - q_len + (token - meta.query_start_loc[seq])
        k = k_pool[layer, meta.block_tables[seq]].reshape(N, T, KV, D).astype(jnp.float32)
        v = v_pool[layer, meta.block_tables[seq]].reshape(N, T, KV, D).astype(jnp.float32)
        k = jnp.repeat(k, H // KV, axis=2)
        v = jnp.repeat(v, H // KV, axis=2)
        s = jnp.einsum("nhd,nthd->nht", q.astype(jnp.float32), k) * scale
        valid = jnp.arange(T)[None, :] <= pos[:, None]
        s = jnp.where(valid[:, None, :], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        p = jnp.where(jnp.isnan(p), 0.0, p)  # padding tokens attend to nothing
        return jnp.einsum("nht,nthd->nhd", p, v).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class PallasBackend(AttentionBackend):
    """The Pallas kernels; pool layout [layers, kv_heads, blocks, block_size, head_dim]."""
    name: str = "pallas"
    interpret: bool = False
    gpu: str | None = None  # tunables for this GPU ("a100" / "h100"); None = the detected one
    block_axis = 2

    def pool_shape(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_layers, num_kv_heads, num_blocks, block_size, head_dim)

    def write(self, k_pool, v_pool, layer, k, v, slot_mapping):
        from jpaged.pallas_kernels.kv_write import write_kv
        return write_kv(k_pool, v_pool, layer, k, v, slot_mapping)

    def attend(self, q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
        from jpaged.pallas_kernels.paged_attention import paged_attention
        from jpaged.pallas_kernels.ragged_paged_attention import ragged_paged_attention
        qk = q.astype(k_pool.dtype)  # Triton dots need one operand type (f32 activations, bf16 pool)
        if meta.query_grid.shape[1] == 1:  # decode: one query token per sequence
            out = paged_attention(qk, k_pool, v_pool, layer, meta.block_tables, meta.context_lens,
                                  scale=scale, interpret=self.interpret, gpu=self.gpu)
        else:
            out = ragged_paged_attention(qk, k_pool, v_pool, layer, meta.block_tables,
                                         meta.context_lens, meta.query_start_loc, scale=scale,
                                         interpret=self.interpret, gpu=self.gpu)
        return out.astype(q.dtype)


def get_backend(name: str) -> AttentionBackend:
    if name == "auto":
        name = "xla" if jax.default_backend() == "cpu" else "pallas"
    if name == "xla":
        return AttentionBackend()
    if name == "reference":
        return ReferenceBackend()
    if name in ("pallas", "pallas-interpret"):
        return PallasBackend(name=name, interpret=name == "pallas-interpret")
    raise ValueError(f"unknown attention_backend {name!r}")
