"""PagedAttention kernels in Pallas (Triton-lowered on NVIDIA GPUs), their
plain-jnp references, and the K/V write into the paged pool.

One pool per K and V for all layers, `[layers, kv_heads, blocks, block_size,
head_dim]`; block tables `[seqs, pages_per_seq]` int32 map token t of sequence s
to block `block_tables[s, t // block_size]`, offset `t % block_size`. Write the
step's K/V first (`write_kv`), then attend: `paged_attention` (decode, one token
per sequence) or `ragged_paged_attention` (packed tokens, causal). On the CPU
pass `interpret=True` (slow; for tests). `jpaged.PagedKVCache` wraps all this.
"""

from .kv_write import write_kv, write_kv_reference
from .paged_attention import paged_attention, paged_attention_reference
from .ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from .tuning import decode_params, ragged_params

__all__ = [
    "paged_attention",
    "paged_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv",
    "write_kv_reference",
    "decode_params",
    "ragged_params",
]
