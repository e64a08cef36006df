"""Engine arguments: one dataclass, validated on construction.

Its fields are the keyword arguments of `jpaged.LLM(...)` and, generated from the
field metadata (`help`, `choices`, `unit`), the flags of the CLI and the server
(`kv_cache_memory` -> `--kv-cache-memory`). Sizes carry their unit in the name
(`kv_cache_memory` bytes, `block_size` tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Any

GiB = 1 << 30

ATTENTION_BACKENDS = ("auto", "cpu", "xla", "reference", "pallas", "pallas-interpret")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PREEMPTION_MODES = ("recompute", "swap")
KV_POLICIES = ("paged", "orca-max", "orca-pow2", "orca-oracle", "static")  # core/kv_alloc_policy.py
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")  # vLLM's


def config_field(default: Any, help: str, *, choices: tuple | None = None,
                 unit: str | None = None) -> Any:
    """A dataclass field whose metadata makes its command-line flag: `help` text, allowed
    `choices`, and `unit="bytes"` for sizes that take units (512MiB)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "unit": unit})


@dataclasses.dataclass
class EngineConfig:
    block_size: int = config_field(16, "tokens per KV cache block, a power of two")
    kv_cache_memory: int | None = config_field(
        None, "bytes of the KV pool, allocated after the weights; takes units (8000000, 512MiB, "
              "2GiB) [default: 2 GiB, or a quarter of RAM if less]", unit="bytes")
    max_num_seqs: int = config_field(64, "most sequences in one step")
    max_num_batched_tokens: int = config_field(
        2048, "most tokens in one step; longer prompts are prefilled in chunks")
    max_mixed_step_tokens: int | None = config_field(
        None, "most tokens in a step that also decodes running sequences, which wait for the "
              "whole step: prompts beyond it are prefilled in the next steps [default: follows "
              "the queue: the smallest token bucket the scheduler cuts to (512 on a GPU) while at "
              "most twice that many prompt tokens wait to be admitted, then what drains the "
              "queue in about two steps, at least twice the bucket; on the CPU, whose dense "
              "layers skip padding, 4 times its 128 (512) while at most that many wait, then "
              "what drains the queue in about two steps, at least 512]")
    max_model_len: int | None = config_field(
        None, "most tokens (prompt + output) of one sequence [default: the model's context length]")
    dtype: str = config_field("auto", "weights and compute dtype; auto = float32 on CPU, bfloat16 "
                                      "on GPU (bfloat16 weights compute with float32 accumulation)",
                              choices=DTYPES)
    kv_cache_dtype: str = config_field(
        "auto", "KV pool dtype; auto = the model's dtype (float32 on CPU where XLA's own ops "
                "would touch the pool: the xla backend, shapes the C++ kernel does not take)",
        choices=DTYPES)
    attention_backend: str = config_field(
        "auto", "paged attention implementation; auto = cpu (the C++ kernel; xla without a "
                "compiler) on CPU, pallas on GPU", choices=ATTENTION_BACKENDS)
    seed: int = config_field(0, "engine seed: draws the seeds of requests that have none")
    enable_prefix_caching: bool = config_field(True, "share the KV blocks of common prompt prefixes")
    preemption_mode: str = config_field(
        "recompute", "what happens to the newest request when the pool is full: its blocks are "
                     "freed and recomputed, or swapped to host memory", choices=PREEMPTION_MODES)
    swap_space: int = config_field(1 * GiB, "bytes of host memory for swapped-out blocks; takes "
                                            "units [default: 1GiB]", unit="bytes")
    kv_policy: str = config_field(
        "paged", "how KV blocks are allocated: paged = on demand (jpaged); the vLLM paper's "
                 "baselines, for benchmarks, reserve each request's space as one contiguous run "
                 "when it is admitted: orca-max = max_model_len tokens, orca-pow2 = the next "
                 "power of two at or above prompt + max_tokens, orca-oracle = exactly prompt + "
                 "max_tokens, static = orca-max with static batches (FasterTransformer: no "
                 "request joins a running batch); the baselines share no blocks",
        choices=KV_POLICIES)
    enable_block_sharing: bool = config_field(
        True, "forked sequences (parallel samples, beams) and common prompt prefixes share KV "
              "blocks, copied on write; off (a benchmark baseline) a fork gets its own copy of "
              "every block at its first write, and prefix caching is off")
    max_logprobs: int = config_field(20, "most top logprobs a request may ask for per token")
    logprobs_mode: str = config_field(
        "raw_logprobs", "what sampled logprobs (the token's, the top ones, cumulative_logprob) "
                        "hold: raw_logprobs = log_softmax of the model's logits; raw_logits = "
                        "the logits; processed_logprobs / processed_logits = the same after the "
                        "sampler's processing (penalties, then for sampled rows temperature and "
                        "the top-k / top-p / min-p filters, filtered tokens -inf; greedy rows: "
                        "penalties only). Prompt logprobs and beam search stay raw_logprobs",
        choices=LOGPROBS_MODES)
    compilation_cache_dir: str | None = config_field(
        None, "where compiled executables are kept across restarts (jpaged's own, for a "
              "model loaded from a path; XLA's persistent cache for an in-memory model); '' "
              "disables it [default: ~/.cache/jpaged/xla, or under $JPAGED_CACHE_DIR]")
    pack_weights: bool | None = config_field(
        None, "pack dense weights into panels once at load for the CPU matmul kernel (a "
              "decode step reads them at memory speed; XLA's dots repack them every call) "
              "[default: on the CPU where the kernel builds, float32 and bfloat16 weights]")
    scan_layers: bool | None = config_field(
        None, "run the layers under nn.scan over stacked weights: compile time does not grow "
              "with depth, steps are slower (XLA copies each layer's weights out of the stack) "
              "[default: unrolled, or an in-memory model's own setting]")
    tensor_parallel_size: int = config_field(
        1, "devices to split the model over (tensor parallelism on a JAX mesh: query and KV "
           "heads and MLP columns split, one all-reduce after attention and one after the MLP; "
           "the KV pool split by KV heads, `kv_cache_memory` over all devices)")
    coordinator_address: str | None = config_field(
        None, "host:port of process 0's JAX coordination service, for a model split over "
              "several processes (jax.distributed); every process passes the same")
    num_processes: int = config_field(
        1, "processes of the JAX program: process 0 is the engine (LLM, jpaged serve), the "
           "others run `jpaged worker` with the same flags and follow its steps")
    process_id: int = config_field(0, "this process's rank, 0 to num_processes - 1")

    def __post_init__(self):
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_logprobs",
                     "tensor_parallel_size", "num_processes"):
            positive(name)
        if not 0 <= self.process_id < self.num_processes or isinstance(self.process_id, bool):
            raise ValueError(f"process_id must be in [0, num_processes={self.num_processes}), "
                             f"got {self.process_id!r}")
        if self.num_processes > 1:
            if not self.coordinator_address:
                raise ValueError(f"num_processes={self.num_processes} needs coordinator_address "
                                 "(host:port of process 0)")
            if self.tensor_parallel_size % self.num_processes:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be a "
                                 f"multiple of num_processes={self.num_processes}: the model is "
                                 "split over every process's devices")
            if self.preemption_mode == "swap":  # each process would swap its own heads' slices
                raise ValueError("preemption_mode='swap' is not available with num_processes > 1; "
                                 "use 'recompute'")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        for name in ("kv_cache_memory", "max_model_len", "max_mixed_step_tokens"):
            if getattr(self, name) is not None:
                positive(name)
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 bytes, got {self.swap_space}")
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            if choices and getattr(self, field.name) not in choices:
                raise ValueError(f"{field.name} must be one of {choices}, "
                                 f"got {getattr(self, field.name)!r}")
        for name in ("scan_layers", "pack_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
