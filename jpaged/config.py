"""Engine arguments: one dataclass, validated on construction.

Its fields are the keyword arguments of `jpaged.LLM(...)` and the flags of the
CLI; sizes carry their unit in the name (`kv_cache_memory` bytes, `block_size`
tokens).
"""
from __future__ import annotations

import dataclasses

GiB = 1 << 30

ATTENTION_BACKENDS = ("auto", "cpu", "xla", "reference", "pallas", "pallas-interpret")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = 2 GiB on CPU (see kv_cache.py)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's own context length
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on GPU
    kv_cache_dtype: str = "auto"  # "auto" = float32 on CPU (XLA's CPU scatter copies a
    # bfloat16 pool through float32), the model's dtype elsewhere
    attention_backend: str = "auto"
    seed: int = 0
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"  # or "swap"
    swap_space: int = 1 * GiB  # bytes of host memory for swapped-out blocks
    max_logprobs: int = 20
    compilation_cache_dir: str | None = None  # None = ~/.cache/jpaged/xla; "" disables
    scan_layers: bool | None = None  # run the layers under nn.scan (compile time flat in depth);
    # None = unrolled (faster steps), or an in-memory model's own setting

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_logprobs"):
            positive(name)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("kv_cache_memory", "max_model_len"):
            if getattr(self, name) is not None:
                positive(name)
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 bytes, got {self.swap_space}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {DTYPES}, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if self.scan_layers is not None and not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be a bool, got {self.scan_layers!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
