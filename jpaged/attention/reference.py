"""The `reference` attention backend: per token, gather its sequence's whole context, mask,
softmax. Slow and obvious; the other backends are tested against it."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .metadata import AttentionMetadata
from .xla import XlaBackend


@dataclasses.dataclass(frozen=True)
class ReferenceBackend(XlaBackend):
    """Per token: gather its sequence's whole context, mask, softmax. Slow, obvious."""
    name: str = "reference"

    def attend(self, q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
        N, H, D = q.shape
        _, _, KV, block_size, _ = k_pool.shape
        T = meta.block_tables.shape[1] * block_size
        token = jnp.arange(N)
        seq = jnp.clip(jnp.searchsorted(meta.query_start_loc, token, side="right") - 1,
                       0, meta.context_lens.shape[0] - 1)
        q_len = meta.query_start_loc[seq + 1] - meta.query_start_loc[seq]
        pos = meta.context_lens[seq] - q_len + (token - meta.query_start_loc[seq])
        k, v = self.block_tokens(k_pool[layer, meta.block_tables[seq]],
                                 v_pool[layer, meta.block_tables[seq]])  # [N, T, KV, D]
        valid = (jnp.arange(T)[None, :] <= pos[:, None]) & (token < meta.query_start_loc[-1])[:, None]
        # Slots past the context may be stale, even NaN: zero them rather than trust a zero weight.
        k, v = (jnp.where(valid[:, :, None, None], x.astype(jnp.float32), 0.0) for x in (k, v))
        k = jnp.repeat(k, H // KV, axis=2)
        v = jnp.repeat(v, H // KV, axis=2)
        s = jnp.einsum("nhd,nthd->nht", q.astype(jnp.float32), k) * scale
        s = jnp.where(valid[:, None, :], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        p = jnp.where(jnp.isnan(p), 0.0, p)  # padding tokens attend to nothing
        return jnp.einsum("nht,nthd->nhd", p, v).astype(q.dtype)
