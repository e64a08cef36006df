"""Sizing the one KV pool: its dtype, `max_model_len`, and how many blocks the memory
budget holds (docs/design.md, "Paging and block tables").

The pool is allocated once, after the weights, and never grows: `kv_cache_memory` bytes
(default 2 GiB, or a quarter of the machine's memory if less) divided by the bytes of one
block. It must hold at least one request of `max_model_len` tokens.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.attention.backend import AttentionBackend
from jpaged.config import EngineConfig, GiB
from jpaged.exceptions import KVCacheTooSmallError
from jpaged.models import ModelConfig
from jpaged.utils import cdiv, kv_bytes_per_block


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    dtype: np.dtype
    block_size: int  # tokens
    num_blocks: int  # device blocks in the pool
    num_host_blocks: int  # swap space (0 unless preemption_mode="swap")
    bytes_per_block: int
    max_model_len: int


def default_kv_cache_memory() -> int:
    """2 GiB, or a quarter of the machine's memory if that is less."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * GiB
    return min(2 * GiB, total // 4)


def available_memory() -> int | None:
    """Bytes the OS can still give this process (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The engine's `max_model_len`, or the model's context length (inside a sliding window:
    jpaged has no sliding-window attention)."""
    limit = model_config.max_position_embeddings
    if model_config.sliding_window:
        limit = min(limit, model_config.sliding_window)
    length = config.max_model_len or limit
    if length > limit:
        raise ValueError(f"max_model_len={length} exceeds the model's context length {limit}")
    return length


def plan_kv_cache(config: EngineConfig, model_config: ModelConfig, param_dtype,
                  backend: AttentionBackend) -> KVCacheConfig:
    """The pool for this engine: `kv_cache_dtype` (auto: what the attention backend keeps
    for these weights, `AttentionBackend.pool_dtype`) and as many blocks as
    `kv_cache_memory` holds."""
    on_cpu = jax.default_backend() == "cpu"
    if config.kv_cache_dtype != "auto":
        dtype = jnp.dtype(config.kv_cache_dtype)
    else:
        dtype = jnp.dtype(backend.pool_dtype(param_dtype, config.block_size, model_config.head_dim))
    length = max_model_len(config, model_config)
    budget = config.kv_cache_memory or default_kv_cache_memory()
    available = available_memory()
    if on_cpu and available is not None and budget > available:
        raise KVCacheTooSmallError(
            f"kv_cache_memory={budget} bytes is more than the {available} bytes of memory "
            f"available after loading the weights: lower kv_cache_memory")
    per_block = kv_bytes_per_block(model_config, config.block_size, dtype)
    num_blocks = budget // per_block
    if num_blocks * config.block_size < length:
        need = cdiv(length, config.block_size) * per_block
        raise KVCacheTooSmallError(
            f"kv_cache_memory={budget} bytes holds {num_blocks * config.block_size} tokens "
            f"({per_block} bytes per block of {config.block_size}), fewer than one request of "
            f"max_model_len={length}: raise kv_cache_memory to at least {need} bytes or lower "
            f"max_model_len")
    num_host_blocks = config.swap_space // per_block if config.preemption_mode == "swap" else 0
    return KVCacheConfig(dtype, config.block_size, num_blocks, num_host_blocks, per_block, length)
