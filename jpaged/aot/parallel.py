"""The engine's tensor-parallel step compiled deviceless for N GPUs of one host, built as the
runner builds it (`runner.model_loader._split`: the module cloned onto `plan_layout`'s
config with a `ShardedBackend`, params in `param_shardings`, the pool split by KV heads, the
logits out replicated), and a roofline of it per GPU: HBM bytes and FLOPs from the model's
shapes, the collectives read from the compiled HLO and timed over NVLink (`roofline`):

    s = Scenario.decode(64, context=2048)
    sharded = sharded_step_specs(step.LLAMA2_70B, s.bucket(), "h100", tp=8)
    roofline(sharded, s, compile_sharded_step(sharded))["step_s"]
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jpaged.attention.sharded import AXIS, ShardedBackend
from jpaged.models.config import ModelConfig
from jpaged.models.registry import model_class
from jpaged.pallas_kernels.gpus import GPUS
from jpaged.runner.input_builder import PREFILL_TILE, InputBuilder, decode_bucket, token_bucket
from jpaged.runner.parallel import param_shardings, plan_layout
from jpaged.utils import cdiv

from . import hlo_cost, step
from .targets import gpu_mesh

# Result bytes of one collective -> bytes each GPU sends one way, for a ring over N GPUs: an
# all-reduce is a reduce-scatter then an all-gather, each moving (N-1)/N of the buffer; a
# reduce-scatter's result is 1/N of what it reduces.
RING_TRAFFIC = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
                "all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: n - 1,
                "collective-permute": lambda n: 1.0}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One step's work: `num_seqs` sequences, each with `new_tokens` new tokens and `context`
    tokens in all (new ones included), in the bucket the engine's input builder picks."""
    kind: str  # "decode" or "prefill"
    num_seqs: int
    new_tokens: int
    context: int
    max_model_len: int = 4096
    block_size: int = 16
    max_num_seqs: int = 64  # the engine's default: a prefill of 512+ tokens has this many rows

    @classmethod
    def decode(cls, num_seqs: int, context: int, **kw) -> "Scenario":
        return cls("decode", num_seqs, 1, context, **kw)

    @classmethod
    def prefill(cls, num_seqs: int, prompt_len: int, **kw) -> "Scenario":
        return cls("prefill", num_seqs, prompt_len, prompt_len, **kw)

    def bucket(self) -> step.Bucket:
        """The engine's (N, B, Q, P) bucket; the pool holds this batch and one full-length
        sequence (its size changes no step's traffic)."""
        builder = InputBuilder(self.block_size, self.max_num_seqs, self.num_seqs * self.new_tokens,
                               self.max_model_len)
        if self.kind == "decode":
            N = B = decode_bucket(self.num_seqs)
            Q = 1
        else:
            N = token_bucket(self.num_seqs * self.new_tokens)
            B, Q = builder.prefill_rows(N, self.num_seqs), min(PREFILL_TILE, N)
        blocks = self.num_seqs * cdiv(self.context, self.block_size) + builder.max_pages + 1
        return step.Bucket(N, B, Q, builder.max_pages, blocks, self.block_size)

    def attention_pairs(self) -> int:
        """(query, key) pairs attention scores, per layer and head: causal over the new tokens."""
        n, c = self.new_tokens, self.context
        return self.num_seqs * (n * (c - n) + n * (n + 1) // 2)


@dataclasses.dataclass
class ShardedStep:
    specs: step.StepSpecs
    out_shardings: tuple
    run_config: ModelConfig  # the layout the devices run (`plan_layout`)
    tp: int
    gpu: str


def sharded_step_specs(config: ModelConfig, bucket: step.Bucket, gpu: str, tp: int, *,
                       scan_layers: bool = True, param_dtype=jnp.bfloat16,
                       kv_dtype=jnp.bfloat16) -> ShardedStep:
    """Abstract arguments of the step over `tp` deviceless GPUs `gpu`. `scan_layers` keeps
    the traced step, and so the compile, from growing with depth (Llama-2-70B over 8
    GPUs: 2-5 s under scan, 24 s unrolled)."""
    mesh = gpu_mesh(gpu, tp, AXIS)
    run = plan_layout(config, tp)
    base = model_class(config.model_type)(config, step.backend_for(gpu), jnp.dtype(param_dtype))
    backend = ShardedBackend(base.backend, mesh)
    module = base.clone(scan_layers=scan_layers).clone(config=run, backend=backend,
                                                       tensor_parallel=tp)
    plain = step.module_step_specs(module, bucket, kv_dtype=kv_dtype)
    replicated = NamedSharding(mesh, P())
    pool_sharding = NamedSharding(mesh, backend.pool_spec(len(plain.kv_pool[0].shape)))
    sds = lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)  # noqa: E731
    params = jax.tree.map(sds, plain.params, param_shardings(plain.params, mesh))
    specs = step.StepSpecs(module, params, tuple(sds(p, pool_sharding) for p in plain.kv_pool),
                           step.input_specs(bucket, replicated))
    return ShardedStep(specs, (replicated, (pool_sharding,) * 2), run, tp, gpu)


def compile_sharded_step(sharded: ShardedStep, dump_to: str | os.PathLike | None = None):
    """The step jitted as `ModelRunner` jits it on a mesh (pool donated, its `out_shardings`)."""
    options = {"xla_dump_to": str(dump_to)} if dump_to else None
    return step.lower_step(sharded.specs, out_shardings=sharded.out_shardings).compile(
        compiler_options=options)


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def collective_seconds(collectives: dict, tp: int, link_bandwidth: float) -> float:
    """Bandwidth time of `hlo_cost.collectives` over a ring of `tp` GPUs (latency left out)."""
    return sum(RING_TRAFFIC[kind](tp) * c["bytes"] for kind, c in collectives.items()) / link_bandwidth


def roofline(sharded: ShardedStep, scenario: Scenario, compiled) -> dict:
    """Time per GPU of `scenario`'s step, compiled from `sharded`. Estimates, not measurements.

    HBM: the GPU's weights read once (the embedding table only at its looked-up rows), every
    live K/V byte of its heads read once and the new K/V written once. FLOPs: 2 per weight
    per token of the split layers, the replicated head on the sampled rows, attention (QK
    and PV) over its heads. NVLink: the HLO's collectives at `RING_TRAFFIC` bytes each, one
    way at `Gpu.nvlink_bandwidth`. Each layer's all-reduce feeds the next matmul, so
    `step_s` adds the NVLink time to max(HBM, FLOPs); `overlapped_s` is the bound were it
    hidden. `compiled_step_s`: `step_s` with the copies the compiled program makes
    (`hlo_cost.slice_copies`: under scanned layers each layer's weights, read and written)
    added to the HBM bytes."""
    target, specs, run, tp = GPUS[sharded.gpu], sharded.specs, sharded.run_config, sharded.tp
    text = compiled.as_text()
    L, D, tokens = run.num_layers, run.head_dim, scenario.num_seqs * scenario.new_tokens
    kv_itemsize = jnp.dtype(specs.kv_pool[0].dtype).itemsize
    weights = device_bytes(specs.params)
    embedding = specs.params["embed_tokens"]["embedding"]
    embedding_bytes = device_bytes(embedding)
    weights_read = weights - embedding_bytes + tokens * embedding_bytes // embedding.shape[0]
    kv_token_bytes = L * (run.num_kv_heads // tp) * D * 2 * kv_itemsize  # K and V, all layers
    kv_read = scenario.num_seqs * scenario.context * kv_token_bytes
    kv_write = tokens * kv_token_bytes
    layers = {k: v for k, v in specs.params.items() if k.startswith("layers")}  # stacked or not
    layer_params = device_bytes(layers) // jnp.dtype(embedding.dtype).itemsize
    flops = 2 * tokens * layer_params + 2 * scenario.num_seqs * run.hidden_size * run.vocab_size \
        + 4 * scenario.attention_pairs() * (run.num_heads // tp) * D * L
    colls = hlo_cost.collectives(text)
    copies = hlo_cost.slice_copies(text)
    hbm = weights_read + kv_read + kv_write
    t_hbm, t_flops = hbm / target.bandwidth, flops / target.peak_flops
    t_link = collective_seconds(colls, tp, target.nvlink_bandwidth)
    step_s = max(t_hbm, t_flops) + t_link
    mem = compiled.memory_analysis()
    return {
        "gpu": sharded.gpu, "tp": tp, "kind": scenario.kind, "num_seqs": scenario.num_seqs,
        "new_tokens": scenario.new_tokens, "context": scenario.context,
        "bucket": dataclasses.asdict(scenario.bucket()),
        "collectives": colls, "link_bytes_per_gpu": t_link * target.nvlink_bandwidth,
        "weights_bytes_per_gpu": weights, "pool_bytes_per_gpu": device_bytes(specs.kv_pool),
        "weights_read_bytes": weights_read, "kv_read_bytes": kv_read, "kv_write_bytes": kv_write,
        "hbm_bytes": hbm, "flops": flops,
        "t_hbm_s": t_hbm, "t_flops_s": t_flops, "t_link_s": t_link, "step_s": step_s,
        "overlapped_s": max(t_hbm, t_flops, t_link),
        "tokens_per_s": (scenario.num_seqs if scenario.kind == "decode" else tokens) / step_s,
        "slice_copy_bytes": copies["bytes"],
        "compiled_step_s": max((hbm + 2 * copies["bytes"]) / target.bandwidth, t_flops) + t_link,
        "memory_analysis": {k: getattr(mem, k) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")},
    }
