"""The contract every paged attention backend keeps (docs/design.md, "Attention backends").

A backend owns the physical layout of the KV pool (K and V, stacked over layers), writes
each step's new K/V into it at `slot_mapping`, and attends over the pages in each
sequence's block table. The model calls `write` BEFORE `attend` in every layer, so the
pool carried from layer to layer is updated in place and never copied (docs/design.md,
"The in-place pool rule"). Whole-block copies and swaps use `block_axis` and
`block_tokens` only, so they work for every layout.
"""
from __future__ import annotations

import abc


class AttentionBackend(abc.ABC):
    name: str
    block_axis: int  # axis of the pool that indexes blocks
    head_axis: int  # axis of the pool that indexes KV heads (tensor parallelism splits it)

    def pool_dtype(self, param_dtype, block_size: int, head_dim: int):
        """The KV pool's dtype when `kv_cache_dtype` is auto: the weights' dtype."""
        return param_dtype

    @abc.abstractmethod
    def pool_shape(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim) -> tuple:
        """Shape of the K pool and of the V pool."""

    @abc.abstractmethod
    def block_tokens(self, k_blocks, v_blocks):
        """Whole blocks [X, blocks, ...] in the pool's layout (X = layers, as `swap_out`
        returns them) -> K, V [X, tokens, kv_heads, head_dim], tokens in block order."""

    @abc.abstractmethod
    def write(self, k_pool, v_pool, layer, k, v, slot_mapping):
        """Scatter new K/V [N, kv_heads, head_dim] into layer `layer`; slot -1 is dropped.
        Returns the updated (k_pool, v_pool)."""

    @abc.abstractmethod
    def attend(self, q, k_pool, v_pool, layer, meta, scale: float):
        """q [N, heads, head_dim] -> [N, heads, head_dim]: each token attends causally to
        its sequence's context through its block table (`meta`: AttentionMetadata)."""
