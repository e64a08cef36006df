"""Any attention backend under tensor parallelism: each device writes and attends over its
own KV heads (`shard_map` over the mesh's `tp` axis), with the same metadata everywhere.
The kernels see a one-device problem with fewer heads: none of them knows about the mesh,
and XLA's partitioner never has to split a custom call it cannot see into."""
from __future__ import annotations

import dataclasses
from typing import Any

from jax import shard_map
from jax.sharding import PartitionSpec as P

from .backend import AttentionBackend

AXIS = "tp"
HEADS = P(None, AXIS, None)  # q, k, v [N, heads, head_dim] split by heads


@dataclasses.dataclass(frozen=True)
class ShardedBackend(AttentionBackend):
    inner: AttentionBackend
    mesh: Any  # a jax.sharding.Mesh with a `tp` axis

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def block_axis(self) -> int:
        return self.inner.block_axis

    @property
    def head_axis(self) -> int:
        return self.inner.head_axis

    def pool_spec(self, ndim: int) -> P:
        spec = [None] * ndim
        spec[self.inner.head_axis] = AXIS
        return P(*spec)

    def pool_dtype(self, param_dtype, block_size: int, head_dim: int):
        return self.inner.pool_dtype(param_dtype, block_size, head_dim)

    def pool_shape(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim) -> tuple:
        return self.inner.pool_shape(num_layers, num_blocks, block_size, num_kv_heads, head_dim)

    def block_tokens(self, k_blocks, v_blocks):
        return self.inner.block_tokens(k_blocks, v_blocks)

    def write(self, k_pool, v_pool, layer, k, v, slot_mapping):
        pool = self.pool_spec(k_pool.ndim)
        return shard_map(self.inner.write, mesh=self.mesh, check_vma=False,
                         in_specs=(pool, pool, P(), HEADS, HEADS, P()), out_specs=(pool, pool))(
            k_pool, v_pool, layer, k, v, slot_mapping)

    def attend(self, q, k_pool, v_pool, layer, meta, scale: float):
        pool = self.pool_spec(k_pool.ndim)
        return shard_map(lambda q, kp, vp, layer, meta: self.inner.attend(q, kp, vp, layer, meta, scale),
                         mesh=self.mesh, check_vma=False,
                         in_specs=(HEADS, pool, pool, P(), P()), out_specs=HEADS)(
            q, k_pool, v_pool, layer, meta)
