"""Per-GPU tunables for the paged attention kernels (from the GPUs of `gpus.py`), and the
Triton switch.

Every Triton-specific choice of `pallas_kernels/` lives in this file: the
`compiler_params` object that makes Pallas lower through Triton instead of
Mosaic GPU, and the warp / pipeline-stage counts that only mean something to
Triton. The kernels themselves use plain Pallas refs (no `plgpu.load` masks, no
atomics), so they run unchanged in interpret mode.

Moving to Mosaic GPU (JAX 0.11 deprecates the Pallas Triton backend) would
touch: `compiler_params()` below (Mosaic GPU's own `CompilerParams`, no
warps/stages), the in-kernel page gather `k_ref[layer, h, pages]` (Triton
builds a tensor of pointers; Mosaic GPU copies whole blocks with TMA, so pages
would be fetched page by page into shared memory with `copy_gmem_to_smem` and
a pipeline instead of one gather), the dots (Mosaic GPU wants warpgroup-sized
tiles, 64 rows), and Hopper-only availability (A100 would need to stay on
Triton or move to Triton through jax-triton, which keeps these kernels' shape
but rewrites their bodies in Triton Python).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .gpus import GPUS, Gpu


@functools.lru_cache(maxsize=None)
def _detect() -> str:
    try:
        kinds = [d.device_kind.lower() for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:
        kinds = []
    if kinds and ("h100" in kinds[0] or "h200" in kinds[0] or "gh200" in kinds[0]):
        return "h100"
    # A100 settings are the safe default: they fit H100 too (smaller smem use).
    return "a100"


def gpu_spec(gpu: str | None) -> Gpu:
    name = (gpu or _detect()).lower()
    if name not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; known: {sorted(GPUS)}")
    return GPUS[name]


def compiler_params(num_warps: int, num_stages: int):
    """The one line that selects the Triton backend (vs Mosaic GPU)."""
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _kv_tile_tokens(gpu: Gpu, head_dim: int, dtype) -> int:
    # Tokens of K (and of V) per inner-loop step. 64 tokens x 128 dims x 2 B =
    # 16 KiB per tensor: with K and V double/triple buffered that is 64/96 KiB of
    # smem, which leaves room for 2 CTAs per SM on both GPUs (latency hiding
    # for a memory-bound loop). 4-byte dtypes halve it to keep the same bytes.
    tokens = 64 * 128 // head_dim
    if jnp.dtype(dtype).itemsize == 4:
        tokens //= 2
    return max(16, min(128, tokens))


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    pages_per_compute_block: int
    num_partitions: int
    num_warps: int
    num_stages: int


def decode_params(
    *,
    num_seqs: int,
    num_kv_heads: int,
    pages_per_seq: int,
    block_size: int,
    head_dim: int,
    dtype,
    gpu: str | None = None,
    pages_per_compute_block: int | None = None,
    num_partitions: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> DecodeParams:
    """Decode tunables; any argument given explicitly wins."""
    g = gpu_spec(gpu)
    ppcb = pages_per_compute_block
    if ppcb is None:
        # The dots need >= 16 tokens per step; page sizes >= the tile use 1 page.
        ppcb = max(1, _kv_tile_tokens(g, head_dim, dtype) // block_size)
        ppcb = max(ppcb, -(-16 // block_size))
    if num_partitions is None:
        # Flash-decoding split: enough programs for ~4 CTAs per SM (so a batch of
        # a few long sequences still fills the GPU), but every partition keeps at
        # least 256 tokens so that its fixed cost (load q, write a float32
        # [heads, head_dim] partial + max + sum) stays ~10% of its K/V bytes.
        programs = num_seqs * num_kv_heads
        want = -(-4 * g.sms // max(1, programs))
        max_by_len = max(1, (pages_per_seq * block_size) // 256)
        max_by_blocks = -(-pages_per_seq // ppcb)
        num_partitions = max(1, min(want, max_by_len, max_by_blocks))
    if num_warps is None:
        # 4 warps cover a [16, 64] logits tile and a [16, head_dim] accumulator
        # with few registers each; more warps would only split tiny dots.
        num_warps = 4
    if num_stages is None:
        num_stages = g.stages
    return DecodeParams(ppcb, num_partitions, num_warps, num_stages)


@dataclasses.dataclass(frozen=True)
class RaggedParams:
    block_q: int  # query tokens per program (x padded GQA group)
    pages_per_compute_block: int
    num_warps: int
    num_stages: int


def ragged_params(
    *,
    group: int,
    block_size: int,
    head_dim: int,
    dtype,
    gpu: str | None = None,
    block_q: int | None = None,
    pages_per_compute_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> RaggedParams:
    """Prefill tunables. `group` is the padded q-heads-per-kv-head."""
    g = gpu_spec(gpu)
    if block_q is None:
        # Rows of the q tile = block_q * group. Prefill is compute-bound: 64 rows
        # (A100, mma.sync m16 x 4 warps) / 128 rows (H100, more registers and smem
        # for a larger tile), so each K/V tile loaded is reused by many queries.
        rows = 64 if g.name == "a100" else 128
        if jnp.dtype(dtype).itemsize == 4:
            rows //= 2
        block_q = _pow2_floor(max(1, rows // group))
        while block_q * group < 16:  # tensor-core dots need >= 16 rows
            block_q *= 2
    ppcb = pages_per_compute_block
    if ppcb is None:
        ppcb = max(1, _kv_tile_tokens(g, head_dim, dtype) // block_size)
        ppcb = max(ppcb, -(-16 // block_size))
    if num_warps is None:
        # 4 warps for a 64x64 logits tile; 8 once the tile is 128 rows.
        num_warps = 8 if block_q * group * ppcb * block_size > 64 * 64 else 4
    if num_stages is None:
        num_stages = g.stages
    return RaggedParams(block_q, ppcb, num_warps, num_stages)
