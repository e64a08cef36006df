"""The `pallas` attention backend: the kernels of `jpaged.pallas_kernels` (Triton-lowered on
NVIDIA GPUs; `pallas-interpret` runs them in interpret mode anywhere, for tests)."""
from __future__ import annotations

import dataclasses

from jpaged.pallas_kernels.kv_write import write_kv
from jpaged.pallas_kernels.paged_attention import paged_attention
from jpaged.pallas_kernels.ragged_paged_attention import ragged_paged_attention

from .backend import AttentionBackend
from .metadata import AttentionMetadata


@dataclasses.dataclass(frozen=True)
class PallasBackend(AttentionBackend):
    """The Pallas kernels; pool layout [layers, kv_heads, blocks, block_size, head_dim]."""
    name: str = "pallas"
    interpret: bool = False
    gpu: str | None = None  # tunables for this GPU ("a100" / "h100"); None = the detected one
    block_axis = 2
    head_axis = 1

    def pool_shape(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim):
        return (num_layers, num_kv_heads, num_blocks, block_size, head_dim)

    def block_tokens(self, k_blocks, v_blocks):
        L, KV, nb, bs, D = k_blocks.shape
        return tuple(x.transpose(0, 2, 3, 1, 4).reshape(L, nb * bs, KV, D) for x in (k_blocks, v_blocks))

    def write(self, k_pool, v_pool, layer, k, v, slot_mapping):
        return write_kv(k_pool, v_pool, layer, k, v, slot_mapping)

    def attend(self, q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
        qk = q.astype(k_pool.dtype)  # Triton dots need one operand type (f32 activations, bf16 pool)
        if meta.query_grid.shape[1] == 1:  # decode: one query token per sequence
            out = paged_attention(qk, k_pool, v_pool, layer, meta.block_tables, meta.context_lens,
                                  scale=scale, interpret=self.interpret, gpu=self.gpu)
        else:
            out = ragged_paged_attention(qk, k_pool, v_pool, layer, meta.block_tables,
                                         meta.context_lens, meta.query_start_loc, scale=scale,
                                         interpret=self.interpret, gpu=self.gpu)
        return out.astype(q.dtype)
