"""Ragged (prefill / mixed) PagedAttention kernel in Pallas.

The new tokens of many sequences are packed in `q [tokens, heads, head_dim]`;
sequence b owns `q[query_start_loc[b]:query_start_loc[b+1]]`. Its K/V (cached
prefix and the new tokens, already written) are its first `context_lens[b]`
tokens in the pool, and query i sits at position `context_lens[b] -
query_len + i`, causal. That covers chunked prefill and prefix-cache hits.

Work is cut into q blocks of `block_q` tokens that never straddle two
sequences (at most `cdiv(tokens, block_q) + seqs` of them). The block ->
(sequence, first token) map is a few tiny XLA ops on int32 vectors; q is
gathered into block order (it is padded for GQA anyway) and the output is
gathered back, so the kernel needs only whole-tile loads and stores: no
masked Triton loads/stores, and padding tokens come out as exact zeros.
Each program handles one q block x one KV head with all that head's query
heads in the rows of its tile (each K/V page is read once per KV head).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import common, tuning


def _ragged_kernel(
    layer_ref,
    seq_ref,
    pos0_ref,
    kv_end_ref,
    bt_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    *,
    scale_log2e: float,
    block_size: int,
    pages_per_compute_block: int,
):
    i, h = pl.program_id(0), pl.program_id(1)
    layer = layer_ref[0]
    seq = seq_ref[i]
    pos0 = pos0_ref[i]  # position of this block's first query
    kv_end = kv_end_ref[i]  # keys [0, kv_end) are visible to some row; 0 = idle
    block_q, group, head_dim = q_ref.shape
    rows = block_q * group
    block_k = pages_per_compute_block * block_size

    q = q_ref[...].reshape(rows, head_dim)
    # Row r is query token r // group of the block (GQA heads are the fast axis).
    q_pos = pos0 + lax.broadcasted_iota(jnp.int32, (rows, block_k), 0) // group
    num_steps = pl.cdiv(kv_end, block_k)

    def step(j, carry):
        o, m, l = carry
        page0 = j * pages_per_compute_block
        pages = bt_ref[seq, pl.ds(page0, pages_per_compute_block)]
        k = k_ref[layer, h, pages].reshape(block_k, head_dim)
        v = v_ref[layer, h, pages].reshape(block_k, head_dim)
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        logits = logits * scale_log2e
        k_pos = page0 * block_size + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        # Causal, and never past the sequence's context (rows past the block's
        # last query are garbage that nobody reads back, but stay finite).
        visible = (k_pos <= q_pos) & (k_pos < kv_end)
        logits = jnp.where(visible, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(logits - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return o * alpha[:, None] + pv, m_new, l

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), common.M_INIT, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    o, _, l = lax.fori_loop(0, num_steps, step, init)
    o = o / jnp.where(l > 0, l, 1.0)[:, None]
    o_ref[...] = o.reshape(block_q, group, head_dim).astype(o_ref.dtype)


def _block_map(query_start_loc, context_lens, num_tokens: int, block_q: int):
    """q blocks that never straddle sequences: per block its sequence, first
    token, position of its first query and the end of its visible keys."""
    num_seqs = context_lens.shape[0]
    num_blocks = pl.cdiv(num_tokens, block_q) + num_seqs  # static upper bound
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    q_len = ends - starts
    blocks = (q_len + block_q - 1) // block_q
    block_end = jnp.cumsum(blocks)
    block_begin = block_end - blocks
    idx = jnp.arange(num_blocks, dtype=jnp.int32)
    # First sequence whose blocks end after idx; zero-length sequences are
    # skipped because their block_end equals the previous one's.
    # compare_all: one small fused compare+sum on GPU; the default binary
    # search becomes a while loop of tiny kernels (measured in the HLO).
    seq = jnp.searchsorted(block_end, idx, side="right", method="compare_all")
    seq = jnp.minimum(seq, num_seqs - 1).astype(jnp.int32)
    j = idx - block_begin[seq]
    first = j * block_q  # first query index in the sequence
    rows = jnp.clip(q_len[seq] - first, 0, block_q)
    rows = jnp.where(idx < block_end[-1], rows, 0)
    pos0 = context_lens[seq] - q_len[seq] + first
    kv_end = jnp.where(rows > 0, pos0 + rows, 0)
    tok0 = starts[seq] + first
    return dict(
        seq=seq, pos0=pos0, kv_end=kv_end, tok0=tok0, block_begin=block_begin, num_blocks=num_blocks
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "block_q",
        "pages_per_compute_block",
        "num_warps",
        "num_stages",
        "interpret",
        "gpu",
    ),
)
def ragged_paged_attention(
    q,
    k_pages,
    v_pages,
    layer,
    block_tables,
    context_lens,
    query_start_loc,
    *,
    scale=None,
    block_q=None,
    pages_per_compute_block=None,
    num_warps=None,
    num_stages=None,
    interpret=False,
    gpu=None,
) -> jax.Array:
    """Causal attention of packed new tokens over paged K/V (prefill, chunked
    prefill, mixed steps).

    `q [tokens, heads, head_dim]`: sequence b's new tokens are
    `q[query_start_loc[b]:query_start_loc[b + 1]]`, at positions
    `context_lens[b] - q_len ... context_lens[b] - 1`; each sees its sequence's
    keys up to its own position. Tokens past `query_start_loc[-1]` give zeros.
    Pools `[layers, kv_heads, blocks, block_size, head_dim]`, one for all layers;
    float32, bfloat16 or float16, with q in the same dtype on a GPU. `heads` a
    multiple of `kv_heads` (GQA); `head_dim` a power of two >= 16, `block_size`
    a power of two. `layer` int32 scalar (may be traced).
    `block_tables [seqs, pages_per_seq]` int32: row b lists sequence b's blocks in
    token order (token t at block `block_tables[b, t // block_size]`, offset
    `t % block_size`; entries past a context may be anything, even -1).
    `context_lens [seqs]` int32: tokens with K/V in the pool, this step's new
    ones included (`write_kv` them first). `query_start_loc [seqs + 1]` int32,
    non-decreasing from 0 (a sequence may have no new tokens).
    `scale`: default `1/sqrt(head_dim)`. Returns `[tokens, heads, head_dim]` in
    q.dtype, float32 softmax and accumulation.
    `interpret=True` runs the kernel in Pallas' interpret mode on any backend
    (the CPU included: slow, for tests); otherwise it lowers through Triton,
    NVIDIA GPUs only. `gpu` and explicit tunables as in `paged_attention`
    (`tuning.ragged_params`). Jitted: all keyword arguments are static.
    """
    num_tokens = q.shape[0]
    num_heads, num_kv_heads, group, head_dim, block_size, pages_per_seq = common.check_shapes(
        q, k_pages, v_pages, block_tables
    )
    gpad = common.group_padded(group, 1)
    cfg = tuning.ragged_params(
        group=gpad,
        block_size=block_size,
        head_dim=head_dim,
        dtype=k_pages.dtype,
        gpu=gpu,
        block_q=block_q,
        pages_per_compute_block=pages_per_compute_block,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    bq, ppcb = cfg.block_q, cfg.pages_per_compute_block
    common.check_pow2("block_q * padded group", bq * gpad, 16)
    common.check_pow2("pages_per_compute_block * block_size", ppcb * block_size, 16)
    scale = common.softmax_scale(scale, head_dim)

    context_lens = context_lens.astype(jnp.int32)
    query_start_loc = query_start_loc.astype(jnp.int32)
    bmap = _block_map(query_start_loc, context_lens, num_tokens, bq)
    nblk = bmap["num_blocks"]
    padded_pages = pl.cdiv(pages_per_seq, ppcb) * ppcb
    block_tables = common.safe_block_tables(block_tables, k_pages.shape[2], padded_pages)

    # q in block order, GQA group padded: [blocks, block_q, kv_heads, gpad, d].
    q4 = common.group_queries(q, num_kv_heads, gpad)
    tok = bmap["tok0"][:, None] + jnp.arange(bq, dtype=jnp.int32)[None, :]
    qb = q4[jnp.clip(tok, 0, num_tokens - 1)]
    layer_arr = common.layer_array(layer)

    kernel = functools.partial(
        _ragged_kernel,
        scale_log2e=scale * common.LOG2E,
        block_size=block_size,
        pages_per_compute_block=ppcb,
    )
    whole = common.whole
    tile = pl.BlockSpec((None, bq, None, gpad, head_dim), lambda i, h: (i, 0, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(nblk, num_kv_heads),
        in_specs=[
            whole(layer_arr),
            whole(bmap["seq"]),
            whole(bmap["pos0"]),
            whole(bmap["kv_end"]),
            whole(block_tables),
            tile,
            whole(k_pages),
            whole(v_pages),
        ],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(qb.shape, q.dtype),
        compiler_params=tuning.compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="jpaged_ragged_paged_attention",
    )(layer_arr, bmap["seq"], bmap["pos0"], bmap["kv_end"], block_tables, qb, k_pages, v_pages)

    # Back to token order; padding tokens (past query_start_loc[-1]) -> 0.
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq_t = jnp.searchsorted(query_start_loc, t, side="right", method="compare_all")
    seq_t = jnp.clip(seq_t - 1, 0, context_lens.shape[0] - 1)
    rel = t - query_start_loc[seq_t]
    blk = jnp.clip(bmap["block_begin"][seq_t] + rel // bq, 0, nblk - 1)
    res = out[blk, rel % bq][:, :, :group]
    real = (t >= query_start_loc[0]) & (t < query_start_loc[-1])
    res = jnp.where(real[:, None, None, None], res, 0)
    return res.reshape(num_tokens, num_heads, head_dim)


@functools.partial(jax.jit, static_argnames=("scale",))
def ragged_paged_attention_reference(
    q, k_pages, v_pages, layer, block_tables, context_lens, query_start_loc, *, scale=None
) -> jax.Array:
    """Plain jnp: every token attends to its own sequence's gathered keys. The
    arguments, layout and result of `ragged_paged_attention`; any backend, any dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[1]
    num_seqs = context_lens.shape[0]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = num_heads // num_kv_heads
    t = jnp.arange(num_tokens)
    seq = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right") - 1, 0, num_seqs - 1)
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    pos = context_lens[seq] - q_len + (t - query_start_loc[seq])
    real = (t >= query_start_loc[0]) & (t < query_start_loc[-1])
    # [kv_heads, tokens, pages, block, d] -> [tokens, kv_heads, keys, d]
    k = (
        k_pages[layer][:, block_tables[seq]]
        .reshape(num_kv_heads, num_tokens, -1, head_dim)
        .swapaxes(0, 1)
    )
    v = (
        v_pages[layer][:, block_tables[seq]]
        .reshape(num_kv_heads, num_tokens, -1, head_dim)
        .swapaxes(0, 1)
    )
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    logits = jnp.einsum("tkgd,tksd->tkgs", qg, k.astype(jnp.float32)) * scale
    valid = (jnp.arange(k.shape[2])[None, :] <= pos[:, None]) & real[:, None]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    probs = jnp.where(valid[:, None, None, :], jax.nn.softmax(logits, -1), 0.0)
    out = jnp.einsum("tkgs,tksd->tkgd", probs, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
