"""Owns the device side: weights, the one KV pool, its swap space, and the jitted step.

`execute` turns the scheduler's output into the step's fixed-shape arrays (the input
builder and the sampling tensors), runs the step and hands back only the sampled token
ids and logprobs. The pool is donated, so XLA updates it in place (docs/design.md,
"The in-place pool rule"); `step_memory_analysis` lets a test prove the step never copies it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.attention.backend import AttentionBackend
from jpaged.attention.metadata import AttentionMetadata
from jpaged.core.scheduler_output import SchedulerOutput
from jpaged.models import ModelConfig
from jpaged.utils import cache_root

from . import block_ops
from .input_builder import InputBuilder, StepInputs
from .kv_cache import KVCacheConfig
from .sampler import sample
from .sampling_tensors import (SamplerMode, SamplerOutput, SamplingTensors, build_sampling_tensors,
                               dummy_sampling_tensors)

_STEP_NAME = "jpaged_step"
_LARGE_STEP_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_LARGE_STEP_TOKENS = 1024
_compile_events: list[str] = []


def _on_event(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration" and _STEP_NAME in str(kwargs.get("fun_name", "")):
        _compile_events.append(kwargs.get("fun_name"))


jax.monitoring.register_event_duration_secs_listener(_on_event)


def num_step_compilations() -> int:
    """Executables built for the step so far in this process (all runners)."""
    return len(_compile_events)


def enable_compilation_cache(path: str | None) -> None:
    """XLA's persistent cache: a restart loads compiled steps instead of compiling."""
    if path == "":
        return
    path = path or str(cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def make_step(module):
    """The engine's step function for a Flax `module` (jit it with the pool donated)."""
    def jpaged_step(params, kv_pool, inputs: StepInputs, sampling: SamplingTensors,
                    mode: SamplerMode) -> tuple[SamplerOutput, tuple[jax.Array, jax.Array]]:
        """One engine step: model forward over the packed new tokens, then sampling.
        Donated: `kv_pool` (updated in place and returned). Static: `mode`."""
        meta = AttentionMetadata.from_inputs(inputs)
        logits, kv_pool = module.apply({"params": params}, inputs.token_ids, inputs.positions,
                                       kv_pool, meta, inputs.logits_index)
        return sample(logits, sampling, mode), kv_pool
    return jpaged_step


class ModelRunner:
    def __init__(self, module, params, model_config: ModelConfig, backend: AttentionBackend,
                 kv: KVCacheConfig, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_logprobs: int, eos_token_ids=()):
        self.module = module
        self.params = params
        self.config = model_config
        self.backend = backend
        self.max_logprobs = max_logprobs
        self.eos_token_ids = tuple(eos_token_ids)
        # A single stream decodes in a 1-row step on the CPU with packed weights (the matmul
        # kernel reads them once whatever the rows) or float32 ones (XLA's dots take a
        # matrix-vector path): a SmolLM2-135M float32 step took 38 ms instead of 105-120 ms
        # padded to 8 rows. Not with unpacked bfloat16: 242 ms for 1 row against 63-71 ms.
        single_row = jax.default_backend() == "cpu" and (
            getattr(module, "packed_weights", False)
            or jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32)
        self.input_builder = InputBuilder(kv.block_size, max_num_seqs, max_num_batched_tokens,
                                          kv.max_model_len, single_row_decode=single_row)
        shape = backend.pool_shape(model_config.num_layers, kv.num_blocks, kv.block_size,
                                   model_config.num_kv_heads, model_config.head_dim)
        self.kv_pool = (jnp.zeros(shape, kv.dtype), jnp.zeros(shape, kv.dtype))
        self.pool_bytes = kv.num_blocks * kv.bytes_per_block
        self.host_pool = block_ops.HostKVPool(self.kv_pool, kv.num_host_blocks, backend.block_axis)
        step = make_step(module)
        self._step = jax.jit(step, static_argnames=("mode",), donate_argnums=(1,))
        # Steps of 1,024+ tokens run their large matmuls faster in XLA's own CPU dots than in
        # YNNPACK's (a 2,048-token step 1.2x faster); smaller steps are faster with YNNPACK
        # (a 64-row decode step 1.1x, a 32-token prefill 2.5x).
        self._large_step = jax.jit(step, static_argnames=("mode",), donate_argnums=(1,),
                                   compiler_options=_LARGE_STEP_CPU_OPTIONS) \
            if jax.default_backend() == "cpu" else self._step

    # ---- the step -------------------------------------------------------------------------

    def execute(self, batch: SchedulerOutput) -> SamplerOutput:
        """Run one scheduled step; returns the sampler's output as numpy arrays, one row per
        sequence of `batch.seqs` (which the input builder may reorder, decode rows longest
        context first)."""
        inputs = self.input_builder.build(batch)
        sampling, mode = build_sampling_tensors(batch, len(inputs.logits_index), self.config.vocab_size,
                                                self.max_logprobs, self.eos_token_ids)
        return self._run(inputs, sampling, mode)

    def _step_for(self, inputs: StepInputs):
        return self._large_step if inputs.token_ids.shape[0] >= _LARGE_STEP_TOKENS else self._step

    def _run(self, inputs: StepInputs, sampling: SamplingTensors, mode: SamplerMode):
        out, self.kv_pool = self._step_for(inputs)(self.params, self.kv_pool, inputs, sampling, mode=mode)
        return jax.device_get(out)

    def _dummy(self, shape: tuple[int, int, int, int], mode: SamplerMode):
        """All-padding inputs of one bucket (N, B, Q, P) and sampling tensors for `mode`."""
        return (self.input_builder.dummy(*shape),
                dummy_sampling_tensors(shape[1], self.config.vocab_size, mode))

    def warmup(self, shape: tuple[int, int, int, int], mode: SamplerMode) -> None:
        """Compile (and run) the step for one bucket (N, B, Q, P) and sampler mode: all-padding
        inputs, which write nothing and read nothing."""
        self._run(*self._dummy(shape, mode), mode)

    def lower(self, shape: tuple[int, int, int, int], mode: SamplerMode):
        inputs, sampling = self._dummy(shape, mode)
        return self._step_for(inputs).lower(self.params, self.kv_pool, inputs, sampling, mode=mode)

    def step_memory_analysis(self, shape: tuple[int, int, int, int], mode: SamplerMode):
        return self.lower(shape, mode).compile().memory_analysis()

    # ---- whole-block operations (copy-on-write, swapping): jitted, the pool donated ----------

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block dst := block src for each (src, dst), in the K and V pools (all reads first)."""
        src, dst = zip(*pairs)
        self.kv_pool = block_ops.copy_blocks(self.kv_pool, src, dst, self.backend.block_axis)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (device block, host block) into the host pool."""
        dev, host = zip(*pairs)
        self.host_pool.store(host, block_ops.gather_blocks(self.kv_pool, dev, self.backend.block_axis))

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (host block, device block) back into the pool."""
        host, dev = zip(*pairs)
        self.kv_pool = block_ops.scatter_blocks(self.kv_pool, dev, self.host_pool.load(host),
                                                self.backend.block_axis)

    def blocks(self, blocks) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the K and V of `blocks` (for tests and inspection)."""
        return block_ops.gather_blocks(self.kv_pool, blocks, self.backend.block_axis)
