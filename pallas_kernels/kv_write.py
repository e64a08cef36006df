"""Writing new K/V into the paged pool at a slot mapping: an XLA scatter.

Why not a Pallas kernel: the write moves only `tokens x kv_heads x head_dim`
elements, scattered one row per token, so it is bound by launch latency and
those few bytes, which XLA's scatter already reaches in one fused kernel.
A Pallas kernel would have to alias the (donated) pool through
`input_output_aliases`, and an opaque custom call in the middle of the layer
scan hides the update from XLA's buffer assignment, which is what keeps the
carried pool in place (docs/design.md, "The in-place pool rule": write the new
K/V first, then read). A scatter with `mode="drop"` on the whole stacked pool is
updated in place when the pool is donated; padding slots (< 0) are sent out of
range and dropped.

Measured caveat (jax 0.10.2): XLA:CPU upcasts a bfloat16/float16 scatter to
float32, converting the whole pool there and back (2x the pool in
temporaries); float32 pools, and bfloat16 on GPU (deviceless A100/H100
compiles: no temporaries), scatter in place.
Bitcasting the pool to uint16 around the scatter does not help on CPU: the
bitcast-convert is materialized as a copy.
"""

from __future__ import annotations

import jax.numpy as jnp


def slots_to_block_offset(slot_mapping, block_size: int, num_blocks: int):
    """Slot -> (block, offset); padding slots (< 0) -> block `num_blocks`,
    which is out of range and dropped (a negative index would wrap around)."""
    slot_mapping = slot_mapping.astype(jnp.int32)
    pad = slot_mapping < 0
    block = jnp.where(pad, num_blocks, slot_mapping // block_size)
    offset = jnp.where(pad, 0, slot_mapping % block_size)
    return block, offset


def write_kv(k_pages, v_pages, layer, k, v, slot_mapping):
    """Scatter `k`, `v` `[tokens, kv_heads, head_dim]` into layer `layer` (int32
    scalar, may be traced) of the pools `[layers, kv_heads, blocks, block_size,
    head_dim]` at `slot_mapping [tokens]` int32 (slot = block * block_size +
    offset; < 0, padding, dropped). k and v are cast to the pools' dtype.
    Returns the updated `(k_pages, v_pages)`; under jit with the pools donated
    they are updated in place. Plain XLA: runs on every backend, no `interpret`."""
    _, _, num_blocks, block_size, _ = k_pages.shape
    block, offset = slots_to_block_offset(slot_mapping, block_size, num_blocks)
    layer = jnp.asarray(layer, jnp.int32)

    # Advanced indices (layer, block, offset) around a slice: the indexed shape
    # is [tokens, kv_heads, head_dim], exactly k's.
    k_pages = k_pages.at[layer, :, block, offset].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[layer, :, block, offset].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def write_kv_reference(k_pages, v_pages, layer, k, v, slot_mapping):
    """NumPy loop, for tests: the arguments of `write_kv`; returns numpy pools."""
    import numpy as np

    kp, vp = np.array(k_pages), np.array(v_pages)
    block_size = kp.shape[3]
    for t, slot in enumerate(np.asarray(slot_mapping)):
        if slot >= 0:
            kp[layer, :, slot // block_size, slot % block_size] = np.asarray(k[t])
            vp[layer, :, slot // block_size, slot % block_size] = np.asarray(v[t])
    return kp, vp
