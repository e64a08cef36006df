"""PagedAttention decode kernel (one new token per sequence) in Pallas.

Each program handles one (sequence, KV head, context partition): it loads the
whole GQA group of query heads of that KV head at once (so every K/V page is
read once per KV head, not once per query head), walks its partition of the
block table a few pages at a time gathering pages straight from the pool, and
keeps an online softmax in float32. Partitions are merged afterwards in XLA
(flash-decoding), so a handful of long sequences still fill the GPU.

The pool is stacked over layers, `[layers, kv_heads, blocks, block_size,
head_dim]`, and the layer is a traced scalar read inside the kernel: no
per-layer slice of the pool is ever materialized.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import common, tuning


def _decode_kernel(
    layer_ref,
    ctx_ref,
    bt_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    m_ref,
    l_ref,
    *,
    scale_log2e: float,
    block_size: int,
    pages_per_compute_block: int,
    pages_per_partition: int,
):
    s, h, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    ctx = ctx_ref[s]
    group, head_dim = q_ref.shape
    block_k = pages_per_compute_block * block_size

    first_page = part * pages_per_partition
    # Pages of this partition that hold live tokens; 0 for padding rows and for
    # partitions past the end of the context (the loop then does not run).
    live_pages = jnp.clip(pl.cdiv(ctx, block_size) - first_page, 0, pages_per_partition)
    num_steps = pl.cdiv(live_pages, pages_per_compute_block)
    q = q_ref[...]

    def step(j, carry):
        o, m, l = carry
        page0 = first_page + j * pages_per_compute_block
        pages = bt_ref[s, pl.ds(page0, pages_per_compute_block)]
        # Gather this step's pages of (layer, head) from the pool: one pointer
        # tensor on Triton, no copy of the pool.
        k = k_ref[layer, h, pages].reshape(block_k, head_dim)
        v = v_ref[layer, h, pages].reshape(block_k, head_dim)
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        logits = logits * scale_log2e  # log2 domain: exp2 is one instruction
        pos = page0 * block_size + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        logits = jnp.where(pos < ctx, logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(logits - m_new[:, None])
        l = l * alpha + p.sum(axis=1)
        # Probabilities go into the dot in the KV dtype (tensor cores); the
        # accumulator stays float32.
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        o = o * alpha[:, None] + pv
        return o, m_new, l

    init = (
        jnp.zeros((group, head_dim), jnp.float32),
        jnp.full((group,), common.M_INIT, jnp.float32),
        jnp.zeros((group,), jnp.float32),
    )
    o, m, l = lax.fori_loop(0, num_steps, step, init)
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "pages_per_compute_block",
        "num_partitions",
        "num_warps",
        "num_stages",
        "interpret",
        "gpu",
    ),
)
def paged_attention(
    q,
    k_pages,
    v_pages,
    layer,
    block_tables,
    context_lens,
    *,
    scale=None,
    pages_per_compute_block=None,
    num_partitions=None,
    num_warps=None,
    num_stages=None,
    interpret=False,
    gpu=None,
) -> jax.Array:
    """Decode attention: one new token per sequence, `q [seqs, heads, head_dim]` (row s
    is sequence s's token, the last of its context) over paged K/V.

    `k_pages`/`v_pages`: `[layers, kv_heads, blocks, block_size, head_dim]`, one pool
    for all layers; float32, bfloat16 or float16, with q in the same dtype on a GPU
    (Triton dots take one operand type). `heads` a multiple of `kv_heads` (GQA);
    `head_dim` a power of two >= 16, `block_size` a power of two.
    `layer`: int32 scalar (may be traced: no per-layer slice of the pool is made).
    `block_tables`: int32 `[seqs, pages_per_seq]`: row s lists sequence s's blocks in
    token order, token t at block `block_tables[s, t // block_size]`, offset
    `t % block_size` (entries past a context may be anything, even -1).
    `context_lens`: int32 `[seqs]`, tokens with K/V in the pool, the new one included
    (`write_kv` it first); 0 for padding rows (their output is 0).
    `scale`: softmax scale, default `1/sqrt(head_dim)`. Returns `[seqs, heads,
    head_dim]` in q.dtype, float32 softmax and accumulation.
    `interpret=True` runs the kernel in Pallas' interpret mode on any backend (the
    CPU included: slow, for tests); otherwise it lowers through Triton, NVIDIA GPUs
    only. `gpu` ("a100"/"h100", default: detected) picks the tunables of
    `tuning.decode_params`; explicit tunables win. Jitted: `scale`, the tunables,
    `interpret` and `gpu` are static.
    """
    num_seqs = q.shape[0]
    num_heads, num_kv_heads, group, head_dim, block_size, pages_per_seq = common.check_shapes(
        q, k_pages, v_pages, block_tables
    )
    cfg = tuning.decode_params(
        num_seqs=num_seqs,
        num_kv_heads=num_kv_heads,
        pages_per_seq=pages_per_seq,
        block_size=block_size,
        head_dim=head_dim,
        dtype=k_pages.dtype,
        gpu=gpu,
        pages_per_compute_block=pages_per_compute_block,
        num_partitions=num_partitions,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    ppcb = cfg.pages_per_compute_block
    common.check_pow2("pages_per_compute_block * block_size", ppcb * block_size, 16)
    scale = common.softmax_scale(scale, head_dim)
    context_lens = context_lens.astype(jnp.int32)

    # Partition = a whole number of compute blocks.
    num_parts = max(1, min(cfg.num_partitions, pl.cdiv(pages_per_seq, ppcb)))
    pages_per_part = pl.cdiv(pl.cdiv(pages_per_seq, num_parts), ppcb) * ppcb
    num_parts = pl.cdiv(pages_per_seq, pages_per_part)
    block_tables = common.safe_block_tables(
        block_tables, k_pages.shape[2], num_parts * pages_per_part
    )

    # GQA group padded to a power of two >= 16 (tensor-core dot minimum).
    gpad = common.group_padded(group, 16)
    q4 = common.group_queries(q, num_kv_heads, gpad)
    layer_arr = common.layer_array(layer)

    kernel = functools.partial(
        _decode_kernel,
        scale_log2e=scale * common.LOG2E,
        block_size=block_size,
        pages_per_compute_block=ppcb,
        pages_per_partition=pages_per_part,
    )
    whole = common.whole
    part_shape = (num_seqs, num_kv_heads, num_parts, gpad)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_parts),
        in_specs=[
            whole(layer_arr),
            whole(context_lens),
            whole(block_tables),
            pl.BlockSpec((None, None, gpad, head_dim), lambda s, h, p: (s, h, 0, 0)),
            whole(k_pages),
            whole(v_pages),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gpad, head_dim), lambda s, h, p: (s, h, p, 0, 0)),
            pl.BlockSpec((None, None, None, gpad), lambda s, h, p: (s, h, p, 0)),
            pl.BlockSpec((None, None, None, gpad), lambda s, h, p: (s, h, p, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(part_shape + (head_dim,), jnp.float32),
            jax.ShapeDtypeStruct(part_shape, jnp.float32),
            jax.ShapeDtypeStruct(part_shape, jnp.float32),
        ],
        compiler_params=tuning.compiler_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="jpaged_paged_attention_decode",
    )(layer_arr, context_lens, block_tables, q4, k_pages, v_pages)

    # Merge partitions (log2 domain, like the kernel). Empty partitions have
    # l = 0 and weigh nothing; an all-empty row (context 0) gives 0, not NaN.
    m_all = m.max(axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)
    l_all = (l * w).sum(axis=2)
    o_all = (o * w[..., None]).sum(axis=2)
    out = o_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    out = out[:, :, :group].reshape(num_seqs, num_heads, head_dim)
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_attention_reference(
    q, k_pages, v_pages, layer, block_tables, context_lens, *, scale=None
) -> jax.Array:
    """Plain jnp decode attention: gather each sequence's pages, mask, softmax. The
    arguments, layout and result of `paged_attention`; any backend, any dtype."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = num_heads // num_kv_heads
    # [kv_heads, seqs, pages, block, d] -> [seqs, kv_heads, tokens, d]
    k = k_pages[layer][:, block_tables].reshape(num_kv_heads, num_seqs, -1, head_dim).swapaxes(0, 1)
    v = v_pages[layer][:, block_tables].reshape(num_kv_heads, num_seqs, -1, head_dim).swapaxes(0, 1)
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim).astype(jnp.float32)
    logits = jnp.einsum("skgd,sktd->skgt", qg, k.astype(jnp.float32)) * scale
    valid = jnp.arange(k.shape[2])[None, :] < context_lens[:, None]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(valid[:, None, None, :], probs, 0.0)  # context 0 -> 0
    out = jnp.einsum("skgt,sktd->skgd", probs, v.astype(jnp.float32))
    return out.reshape(num_seqs, num_heads, head_dim).astype(q.dtype)
