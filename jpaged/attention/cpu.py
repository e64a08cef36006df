"""The `cpu` attention backend: `csrc/paged_attention_cpu.cc` as two XLA FFI custom calls,
the paged attention and the in-place write of each step's K/V into the pool.

The kernel is compiled on first use for this machine's CPU (`jpaged.ops.build`: cached by
a hash of the source, flags, jaxlib and CPU) and registered with `jax.ffi` (JAX's
documented way to add a CPU kernel to XLA; Pallas has no CPU backend). Without a
compiler, `auto` keeps the pure-jnp `xla` backend and logs why. `paged_attention` and
`write_kv` are public ops too, for a decoder of your own (docs/design.md, "Paged attention
as a library").

Pool layout, block copies and swaps are the `xla` backend's. `write` stores new K/V in place
(the call's outputs aliased to the donated pool): XLA's own CPU scatter copies a bfloat16
pool through float32, this write does not, so on the CPU a bfloat16 model gets a bfloat16
pool (`runner/kv_cache.py`). `attend` runs the kernel for the shapes it handles
(`supported`), the `xla` loop otherwise.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.exceptions import KernelBuildError
from jpaged.ops import build as build_lib

from .metadata import AttentionMetadata
from .xla import XlaBackend

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention_cpu.cc"
TARGET = "jpaged_paged_attention"
WRITE_TARGET = "jpaged_write_kv"
HEAD_DIMS = (16, 32, 64, 96, 128, 256)  # the kernel's instantiations


def supported(block_size: int, head_dim: int) -> bool:
    """Shapes the kernel handles: these head dims and every power-of-two block size (it
    reads keys 16 at a time: a part of a larger block, or 16 / block_size smaller ones)."""
    return block_size >= 1 and (block_size & (block_size - 1)) == 0 and head_dim in HEAD_DIMS


def build(path: Path) -> None:
    """Compile the kernel to `path` (see `jpaged.ops.build`)."""
    build_lib.build(SOURCE, path)


# load(): build (once per machine) and register both kernels; available(): None or why not.
load, available = build_lib.ffi_library(SOURCE, "attention kernel",
                                        {TARGET: "JpagedPagedAttention", WRITE_TARGET: "JpagedWriteKV"})


def require() -> None:
    """Build and register the kernel (once per machine), or raise KernelBuildError saying why
    it cannot be and what to use instead."""
    if (reason := available()) is not None:
        raise KernelBuildError(
            f"jpaged's C++ CPU attention kernel is unavailable here: {reason}. The `xla` and "
            "`reference` backends (jpaged.attention.selector.get_backend, or "
            "PagedKVCache.create(..., backend='xla')) keep the same pool layout in plain jnp")


def paged_attention(q, k_pool, v_pool, layer, block_tables, context_lens, query_start_loc,
                    scale: float):
    """The C++ kernel as a library op: causal attention of packed new tokens over paged K/V.

    q: [N, heads, head_dim], any float dtype (read as float32); sequence b's new tokens
      are q[query_start_loc[b]:query_start_loc[b + 1]], at positions context_lens[b] -
      q_len ... context_lens[b] - 1; rows past query_start_loc[-1] are padding (zeros out).
    k_pool, v_pool: [layers, blocks, kv_heads, block_size, head_dim], float32 or bfloat16,
      one pool for all layers; inside each block K is stored transposed ([kv_heads,
      head_dim, block_size] in the same bytes): fill it with `write_kv` (or `XlaBackend.write`).
      heads a multiple of kv_heads (GQA); head_dim in HEAD_DIMS; block_size a power of two.
    layer: int32 scalar (may be traced). block_tables: int32 [B, pages]: row b lists sequence
      b's blocks in token order (token t at block block_tables[b, t // block_size], offset
      t % block_size); entries past its context are not read.
    context_lens: int32 [B], tokens of each sequence with K/V in the pool, this step's new
      ones included (write them first); 0 = an idle row. query_start_loc: int32 [B + 1].
    scale: the softmax scale (1/sqrt(head_dim) for the usual attention).
    Returns float32 [N, heads, head_dim]. Runs under jit; KernelBuildError if the kernel
    cannot be built here (`available()` says why beforehand)."""
    require()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k_pool, v_pool, jnp.asarray(layer, jnp.int32),
                block_tables.astype(jnp.int32), context_lens.astype(jnp.int32),
                query_start_loc.astype(jnp.int32), scale=np.float32(scale))


def write_kv(k_pool, v_pool, layer, k, v, slot_mapping):
    """The pools with k, v [N, kv_heads, head_dim] stored at `slot_mapping` (int32 [N], slot =
    block * block_size + offset) in layer `layer`; pools [layers, blocks, kv_heads,
    block_size, head_dim] in float32 or bfloat16, laid out as `paged_attention` reads them
    (K transposed inside each block). Slots outside the pool, such as padding's -1, are
    dropped. The outputs alias the pools: under jit with the pools donated, nothing is
    copied. KernelBuildError if the kernel cannot be built here."""
    require()
    pools = (jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype), jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype))
    call = jax.ffi.ffi_call(WRITE_TARGET, pools, input_output_aliases={0: 0, 1: 1})
    # The kernel takes float32 or bfloat16 K/V; other dtypes arrive as float32.
    k, v = ((x if x.dtype in (jnp.float32, jnp.bfloat16) else x.astype(jnp.float32)) for x in (k, v))
    return call(k_pool, v_pool, jnp.asarray(layer, jnp.int32), k, v, slot_mapping.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class CpuBackend(XlaBackend):
    """The C++ kernel over the `xla` backend's pool; the CPU default when it builds.
    Shapes the kernel does not handle (`supported`) take the `xla` path, same pool."""
    name: str = "cpu"

    def pool_dtype(self, param_dtype, block_size: int, head_dim: int):
        """The weights' dtype where the kernel writes and reads the pool (float32, bfloat16;
        its shapes); float32 otherwise, as the `xla` path it then takes wants on the CPU."""
        dtype = jnp.dtype(param_dtype)
        if dtype in (jnp.float32, jnp.bfloat16) and supported(block_size, head_dim):
            return dtype
        return jnp.dtype(jnp.float32)

    def write(self, k_pool, v_pool, layer, k, v, slot_mapping):
        if k_pool.dtype not in (jnp.float32, jnp.bfloat16):
            return super().write(k_pool, v_pool, layer, k, v, slot_mapping)
        return write_kv(k_pool, v_pool, layer, k, v, slot_mapping)

    def attend(self, q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
        if not supported(k_pool.shape[3], k_pool.shape[4]) or k_pool.dtype not in (jnp.float32, jnp.bfloat16):
            return super().attend(q, k_pool, v_pool, layer, meta, scale)
        out = paged_attention(q, k_pool, v_pool, layer, meta.block_tables, meta.context_lens,
                              meta.query_start_loc, scale)
        return out.astype(q.dtype)
