"""Owns the device side: weights, the one KV pool, and the jitted step.

`execute` hands the step the input builder's numpy arrays and gets back only
the sampled token ids (and logprobs). The pool is donated, so XLA updates it in
place; `step_memory_analysis` lets a test prove the step never copies it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.config import ModelConfig

from .attention import AttentionBackend, AttentionMetadata
from .input_builder import StepInputs
from .sampler import SamplerMode, SamplerOutput, SamplingTensors, sample

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


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype) -> int:
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim \
        * jnp.dtype(dtype).itemsize


class ModelRunner:
    def __init__(self, module, params, model_config: ModelConfig, backend: AttentionBackend,
                 num_blocks: int, block_size: int, kv_dtype):
        self.module = module
        self.params = params
        self.config = model_config
        self.backend = backend
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = backend.pool_shape(model_config.num_layers, num_blocks, block_size,
                                   model_config.num_kv_heads, model_config.head_dim)
        self.kv_pool = (jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype))
        self.pool_bytes = 2 * int(np.prod(shape)) * jnp.dtype(kv_dtype).itemsize
        step = _make_step(module)
        self._step = jax.jit(step, static_argnames=("mode",), donate_argnums=(1,))
        # Steps of 1,024+ tokens run their large matmuls faster in XLA's own CPU dots than in
        # YNNPACK's (a 2,048-token step 1.2x faster); smaller steps are faster with YNNPACK
        # (a 64-row decode step 1.1x, a 32-token prefill 2.5x).
        self._large_step = jax.jit(step, static_argnames=("mode",), donate_argnums=(1,),
                                   compiler_options=_LARGE_STEP_CPU_OPTIONS) \
            if jax.default_backend() == "cpu" else self._step

    def _step_for(self, inputs: StepInputs):
        return self._large_step if inputs.token_ids.shape[0] >= _LARGE_STEP_TOKENS else self._step

    def execute(self, inputs: StepInputs, sampling: SamplingTensors, mode: SamplerMode):
        out, self.kv_pool = self._step_for(inputs)(self.params, self.kv_pool, inputs, sampling, mode=mode)
        return jax.device_get(out)

    def lower(self, inputs: StepInputs, sampling: SamplingTensors, mode: SamplerMode):
        return self._step_for(inputs).lower(self.params, self.kv_pool, inputs, sampling, mode=mode)

    def step_memory_analysis(self, inputs, sampling, mode):
        return self.lower(inputs, sampling, mode).compile().memory_analysis()

    # ---- whole-block operations (copy-on-write, swapping): jitted, the pool donated ----------

    def copy_blocks(self, src, dst) -> None:
        """Block dst[i] := block src[i] in the K and V pools (all reads before writes)."""
        from .kv_blocks import copy_blocks
        self.kv_pool = copy_blocks(self.kv_pool, src, dst, self.backend.block_axis)

    def swap_out(self, blocks) -> tuple[np.ndarray, np.ndarray]:
        """Host (numpy) copies of the K and V of `blocks`, stacked along the block axis."""
        from .kv_blocks import gather_blocks
        return gather_blocks(self.kv_pool, blocks, self.backend.block_axis)

    def swap_in(self, blocks, k, v) -> None:
        """Write host arrays (as `swap_out` returns them) into `blocks`."""
        from .kv_blocks import scatter_blocks
        self.kv_pool = scatter_blocks(self.kv_pool, blocks, (k, v), self.backend.block_axis)


def _make_step(module):
    def jpaged_step(params, kv_pool, inputs: StepInputs, sampling: SamplingTensors,
                    mode: SamplerMode) -> tuple[SamplerOutput, tuple[jax.Array, jax.Array]]:
        """One engine step: model forward over the packed new tokens, then sampling.
        Donated: `kv_pool` (updated in place and returned). Static: `mode`."""
        meta = AttentionMetadata.from_inputs(inputs)
        logits, kv_pool = module.apply({"params": params}, inputs.token_ids, inputs.positions,
                                       kv_pool, meta, inputs.logits_index)
        return sample(logits, sampling, mode), kv_pool
    return jpaged_step


def enable_compilation_cache(path: str | None) -> None:
    """XLA's persistent cache: a restart loads compiled steps instead of compiling."""
    if path == "":
        return
    from jpaged.models.loader import cache_root
    path = path or str(cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
