"""Small helpers that host and device code share: ceiling division, power-of-two
buckets, the folder jpaged caches things in, and the bytes one KV block takes.
No jax here: the host side (scheduler, block manager) imports this too."""
from __future__ import annotations

import os
import pathlib

import numpy as np


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive integers: blocks for a tokens, pages of a table, ..."""
    return -(-a // b)


def next_power_of_2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= n (and >= minimum)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def cache_root() -> pathlib.Path:
    """Where jpaged keeps what it builds once per machine (tokenizers, compiled steps, the CPU
    kernel): $JPAGED_CACHE_DIR, else $XDG_CACHE_HOME/jpaged, else ~/.cache/jpaged."""
    if os.environ.get("JPAGED_CACHE_DIR"):
        return pathlib.Path(os.environ["JPAGED_CACHE_DIR"]).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "jpaged"


def kv_bytes_per_block(model_config, block_size: int, dtype) -> int:
    """Bytes of one KV block: K and V of `block_size` tokens in every layer.
    `model_config`: anything with num_layers, num_kv_heads and head_dim (a ModelConfig)."""
    return (2 * model_config.num_layers * block_size * model_config.num_kv_heads
            * model_config.head_dim * np.dtype(dtype).itemsize)
