"""The kernels on NVIDIA GPUs, proven without one.

1. Lowering for `cuda` works with plain (CPU) jaxlib: the StableHLO holds the
   Triton custom call with our kernel names, and a layer scan over the stacked
   pool never materializes a per-layer slice of it.
2. Deviceless ahead-of-time compilation for A100 (sm_80) and H100 (sm_90a)
   of the kernels and of the engine's whole step (`jpaged.aot`, with the target
   configs jpaged ships): needs the CUDA plugin (`jax[cuda12-local]`, kept out
   of the main venv: see jpaged/aot/gpu_targets/README.md); skipped with the
   reason when absent, a failure under JPAGED_REQUIRE_DEVICELESS=1.
3. Tensor parallelism: the engine's sharded step for Llama-2-70B compiled
   deviceless for 8 GPUs (`jpaged.aot.parallel`), its collectives counted.
4. The HLO cost model of `jpaged.aot.hlo_cost` on CPU compiles.
5. The GPU scripts import and parse `--help`.
"""

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.aot import hlo_cost, parallel, step, targets
from jpaged.attention.selector import get_backend
from jpaged.models.config import ModelConfig
from jpaged.pallas_kernels import paged_attention, ragged_paged_attention, write_kv
from jpaged.pallas_kernels.gpus import GPUS
from jpaged.runner.sampling_tensors import SamplerMode

TRITON_CALL = "__gpu$xla.gpu.triton"
DECODE_NAME = "jpaged_paged_attention_decode"
RAGGED_NAME = "jpaged_ragged_paged_attention"
REPO = Path(__file__).resolve().parents[2]
sd = jax.ShapeDtypeStruct


def _specs(
    num_seqs,
    num_tokens,
    layers,
    kv_heads,
    group,
    head_dim,
    blocks,
    block_size,
    pages_per_seq,
    dtype,
    sharding=None,
):
    s = lambda shape, dt: sd(shape, dt, sharding=sharding)
    pool = s((layers, kv_heads, blocks, block_size, head_dim), dtype)
    heads = kv_heads * group
    decode = (
        s((num_seqs, heads, head_dim), dtype),
        pool,
        pool,
        s((), jnp.int32),
        s((num_seqs, pages_per_seq), jnp.int32),
        s((num_seqs,), jnp.int32),
    )
    ragged = (
        (s((num_tokens, heads, head_dim), dtype),) + decode[1:] + (s((num_seqs + 1,), jnp.int32),)
    )
    return decode, ragged


def _lower_cuda(f, specs):
    return jax.jit(f).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


# (kv_heads, group, head_dim, block_size, dtype)
LOWERING = [
    (2, 4, 128, 16, jnp.bfloat16),
    (3, 3, 64, 8, jnp.float32),
    (1, 1, 128, 128, jnp.float16),
]


@pytest.mark.parametrize("kvh,group,d,bs,dtype", LOWERING)
def test_kernels_lower_for_cuda(kvh, group, d, bs, dtype):
    dec, rag = _specs(8, 64, 4, kvh, group, d, 96, bs, 6, dtype)
    text = _lower_cuda(paged_attention, dec)
    assert TRITON_CALL in text and f'name = "{DECODE_NAME}"' in text
    assert re.search(r"num_warps = \d+", text)
    text = _lower_cuda(ragged_paged_attention, rag)
    assert TRITON_CALL in text and f'name = "{RAGGED_NAME}"' in text


def test_layer_scan_reads_pool_in_place():
    """Under a scan over layers with the pool closed over, the pool goes to the
    kernel whole: no per-layer [kv_heads, blocks, block, d] slice exists."""
    dec, _ = _specs(8, 64, 5, 2, 2, 64, 96, 16, 6, jnp.bfloat16)
    q, kp, vp, _, bt, ctx = dec

    def layers(q, kp, vp, bt, ctx):
        def body(x, layer):
            return paged_attention(x, kp, vp, layer, bt, ctx), None

        return jax.lax.scan(body, q, jnp.arange(5, dtype=jnp.int32))[0]

    text = _lower_cuda(layers, (q, kp, vp, bt, ctx))
    assert TRITON_CALL in text
    assert "tensor<2x96x16x64xbf16>" not in text  # a per-layer slice


def test_write_kv_lowers_for_cuda_as_scatter():
    dec, _ = _specs(8, 64, 4, 2, 2, 64, 96, 16, 6, jnp.bfloat16)
    kv = sd((64, 2, 64), jnp.bfloat16)
    text = _lower_cuda(write_kv, (dec[1], dec[2], dec[3], kv, kv, sd((64,), jnp.int32)))
    assert "stablehlo.scatter" in text and TRITON_CALL not in text


# --- deviceless AOT compilation for A100 / H100 -----------------------------

ARCH = {"a100": "sm_80", "h100": "sm_90a"}  # the PTX .target each GPU's code must have
# name: (num_seqs, num_tokens, layers, kv_heads, group, head_dim, blocks,
#        block_size, pages_per_seq): 64 sequences with 2048-token contexts,
# a 2048-token prefill bucket, bfloat16 (a 7B pool of 6144 blocks is 51 GB:
# what fits next to the weights on an 80 GB GPU).
MODELS = {
    "llama2-7b": (64, 2048, 32, 32, 1, 128, 6144, 16, 128),
    "small-gqa": (64, 2048, 30, 3, 3, 64, 8448, 16, 128),  # SmolLM2-135M-like
}


def _deviceless_sharding(gpu):
    """The replicated sharding on the deviceless `gpu`, or a skip saying why there is none."""
    reason = targets.deviceless_unavailable_reason(gpu)
    if reason:
        # The GPU-target CI job sets JPAGED_REQUIRE_DEVICELESS=1: there a missing plugin or
        # target config is an error, not a silent skip.
        if os.environ.get("JPAGED_REQUIRE_DEVICELESS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return targets.gpu_sharding(gpu)


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize(
    "model,kernel", [("llama2-7b", "decode"), ("llama2-7b", "ragged"), ("small-gqa", "decode")]
)
def test_deviceless_compile(gpu, model, kernel, tmp_path):
    rep = _deviceless_sharding(gpu)
    dec, rag = _specs(*MODELS[model], jnp.bfloat16, sharding=rep)
    f, specs, name = {
        "decode": (paged_attention, dec, DECODE_NAME),
        "ragged": (ragged_paged_attention, rag, RAGGED_NAME),
    }[kernel]
    compiled = (
        jax.jit(lambda *a: f(*a, gpu=gpu))
        .trace(*specs)
        .lower()
        .compile(compiler_options={"xla_dump_to": str(tmp_path)})
    )

    hlo = compiled.as_text()
    assert TRITON_CALL in hlo and name in hlo
    ptx = [
        p for p in glob.glob(str(tmp_path / "*.ptx")) if f".entry {name}(" in Path(p).read_text()
    ]
    assert ptx, "kernel PTX not dumped"
    text = Path(ptx[0]).read_text()
    arch = ARCH[gpu]
    assert re.search(rf"^\.target {arch}\b", text, re.M), "wrong architecture"
    assert "mma.sync" in text or "wgmma" in text, "dots not on tensor cores"
    # The launch fits the GPU's shared memory, and the step never copies the
    # pool (temporaries are the q/partial buffers, far below the pool's size).
    thunks = Path(glob.glob(str(tmp_path / "*thunk_sequence.txt"))[0]).read_text()
    smem = int(re.search(rf"{name} grid: .*shared_memory: (\d+) bytes", thunks).group(1))
    assert 0 < smem <= GPUS[gpu].smem_kib * 1024
    pool_bytes = np.prod(specs[1].shape) * 2
    assert compiled.memory_analysis().temp_size_in_bytes < pool_bytes / 50
    launch = re.search(rf"{name} (grid: \[.*?\] threads: \[.*?\])", thunks).group(1)
    print(f"{gpu} {model} {kernel}: {arch}, {launch}, smem {smem} B")


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_deviceless_write_kv_in_place(gpu):
    """The bfloat16 K/V scatter into a donated 7B-sized pool: no copy."""
    rep = _deviceless_sharding(gpu)
    dec, _ = _specs(*MODELS["llama2-7b"], jnp.bfloat16, sharding=rep)
    kv = sd((64, 32, 128), jnp.bfloat16, sharding=rep)
    slots = sd((64,), jnp.int32, sharding=rep)
    compiled = (
        jax.jit(write_kv, donate_argnums=(0, 1))
        .trace(dec[1], dec[2], dec[3], kv, kv, slots)
        .lower()
        .compile()
    )
    assert compiled.memory_analysis().temp_size_in_bytes < 1 << 20


# --- the engine's whole step --------------------------------------------------
#
# `jpaged.aot.step` builds the step's abstract inputs (params from the model's
# `init` shapes, the donated pool, the input builder's bucket, sampling
# tensors) and compiles `model_runner.make_step` exactly as ModelRunner jits
# it. Buckets: decode of 64 sequences with 2048-token block tables, and a
# 2048-token prefill bucket (8 sequences, queries up to 512 tokens).

STEP_MODELS = ["smollm2-135m", "llama2-7b"]
# Pool blocks: a 7B pool of 6144 blocks is 51 GB (what fits next to 13.5 GB of
# weights on an 80 GB GPU); SmolLM2's 8448 blocks are 3.1 GB.
STEP_BLOCKS = {"smollm2-135m": 8448, "llama2-7b": 6144}
MAX_MODEL_LEN = 2048


def _step_bucket(model, kind):
    if kind == "decode":
        return step.Bucket.decode(64, max_model_len=MAX_MODEL_LEN, num_blocks=STEP_BLOCKS[model])
    return step.Bucket.prefill(2048, 8, 512, max_model_len=MAX_MODEL_LEN,
                               num_blocks=STEP_BLOCKS[model])


@pytest.mark.parametrize("backend", ["aot", "engine"])
def test_engine_step_lowers_for_cuda(backend):
    """The whole bfloat16 step (SmolLM2 shapes) lowers for `cuda` with plain jaxlib,
    with the Triton calls of both kernels in it (float32 activations, bfloat16 pool).
    `engine` is the engine's own `get_backend("pallas")`; `aot` names the GPU's tunables."""
    be = step.backend_for("a100") if backend == "aot" else get_backend("pallas")
    cfg = step.SMOLLM2_135M
    for kind, name in [("decode", DECODE_NAME), ("prefill", RAGGED_NAME)]:
        specs = step.step_specs(cfg, _step_bucket("smollm2-135m", kind), backend=be)
        text = step.lower_step(specs, platforms=("cuda",)).as_text()
        assert TRITON_CALL in text and f'name = "{name}"' in text, kind


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("model", STEP_MODELS)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_deviceless_engine_step(gpu, model, kind, tmp_path):
    """The engine's whole jitted step (pallas backend, bfloat16) compiles for the GPU:
    the PTX of the attention kernel targets its architecture and uses tensor cores,
    the pool is donated (aliased to the output) and never copied."""
    _deviceless_sharding(gpu)  # skips with the reason when the plugin or config is missing
    cfg = step.MODELS[model]()
    bucket = _step_bucket(model, kind)
    name = DECODE_NAME if kind == "decode" else RAGGED_NAME
    compiled = step.compile_step(cfg, bucket, gpu, dump_to=tmp_path)

    hlo = compiled.as_text()
    assert TRITON_CALL in hlo and name in hlo
    calls = [line for line in hlo.splitlines() if TRITON_CALL in line and name in line]
    assert len(calls) == cfg.num_layers  # one kernel call per (unrolled) layer
    ptx = [p for p in glob.glob(str(tmp_path / "*.ptx")) if f".entry {name}(" in Path(p).read_text()]
    assert ptx, "kernel PTX not dumped"
    arch = ARCH[gpu]
    for p in glob.glob(str(tmp_path / "*.ptx")):  # every kernel of the step, XLA's too
        assert re.search(rf"^\.target {arch}\b", Path(p).read_text(), re.M), p
    text = Path(ptx[0]).read_text()
    assert "mma.sync" in text or "wgmma" in text, "attention dots not on tensor cores"

    mem = compiled.memory_analysis()
    pool = step.pool_bytes(cfg, bucket)
    assert mem.alias_size_in_bytes >= pool  # K and V pools donated: updated in place
    assert mem.temp_size_in_bytes < pool / 50, (mem.temp_size_in_bytes, pool)
    thunks = Path(glob.glob(str(tmp_path / "*thunk_sequence.txt"))[0]).read_text()
    launch = re.search(rf"{name} (grid: \[.*?\] threads: \[.*?\]  shared_memory: \d+)", thunks)
    assert launch
    print(f"{gpu} {model} {kind}: {arch}, {launch.group(1)} B, temp "
          f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, pool {pool / 2**30:.1f} GiB")


@pytest.mark.slow
@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_deviceless_engine_step_sampling_modes(gpu):
    """The sampler for 256 rows with every path compiled in (filters, penalties over the
    vocabulary, logprobs), 7B's vocabulary: its temporaries stay a few [rows, vocab]
    arrays, small beside a pool."""
    _deviceless_sharding(gpu)
    mode = SamplerMode(use_penalties=True, num_logprobs=20)
    compiled = step.compile_sampler(step.LLAMA2_7B.vocab_size, 256, gpu, mode=mode)
    text = compiled.as_text()
    assert "while" in text  # the exact filter path's rejection rounds
    logits_bytes = 256 * step.LLAMA2_7B.vocab_size * 4
    assert compiled.memory_analysis().temp_size_in_bytes < 16 * logits_bytes


# --- tensor parallelism: Llama-2-70B over 8 GPUs --------------------------------


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_deviceless_sharded_70b_step(gpu, kind):
    """The engine's tensor-parallel step (Llama-2-70B over 8 deviceless GPUs, Pallas,
    bfloat16, layers scanned; 2-8 s to compile) runs the Triton kernel on each GPU's heads
    and exactly two all-reduces per layer (after o_proj and down_proj) of the residual
    stream [N, hidden], which is float32 (4 bytes a value, not bfloat16's 2), and no other
    collective: the embedding, head, norms and step inputs are replicated. Each GPU holds
    its share of the weights and of the pool, which stays donated and is never copied."""
    _deviceless_sharding(gpu)
    cfg, tp = step.LLAMA2_70B, 8
    scenario = (parallel.Scenario.decode(64, 2048) if kind == "decode"
                else parallel.Scenario.prefill(4, 512))
    bucket = scenario.bucket()
    sharded = parallel.sharded_step_specs(cfg, bucket, gpu, tp)
    compiled = parallel.compile_sharded_step(sharded)
    hlo = compiled.as_text()
    name = DECODE_NAME if kind == "decode" else RAGGED_NAME
    assert TRITON_CALL in hlo and name in hlo

    row = parallel.roofline(sharded, scenario, compiled)
    L, H, KV, D, E, I, V = (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size)
    activation_bytes = 4
    assert row["collectives"] == {"all-reduce": {
        "count": 2 * L, "bytes": 2 * L * bucket.num_tokens * E * activation_bytes}}
    assert row["link_bytes_per_gpu"] == pytest.approx(
        2 * (tp - 1) / tp * row["collectives"]["all-reduce"]["bytes"])
    split = E * (H + 2 * KV) * D + H * D * E + 3 * E * I  # qkv, o, gate_up, down
    weights = 2 * (L * split // tp + 2 * L * E + 2 * V * E + E)  # + norms, embedding, head
    assert row["weights_bytes_per_gpu"] == weights
    pool = row["pool_bytes_per_gpu"]
    assert pool == step.pool_bytes(cfg, bucket) // tp
    mem = compiled.memory_analysis()
    assert weights + pool <= mem.argument_size_in_bytes < weights + pool + (1 << 20)
    assert mem.alias_size_in_bytes >= pool  # the pool's shards donated: updated in place
    # Temporaries: one layer's weights sliced out of the scan's stack (about 1/85 of the
    # GPU's weights) and activations; never a copy of the pool or of every layer's weights.
    assert mem.temp_size_in_bytes < min(weights / 40, max(pool / 20, 1 << 30))
    print(f"{tp} x {gpu} {kind}: {row['collectives']}, step {row['step_s'] * 1e3:.2f} ms "
          f"(HBM {row['t_hbm_s'] * 1e3:.2f}, FLOP {row['t_flops_s'] * 1e3:.2f}, "
          f"NVLink {row['t_link_s'] * 1e3:.2f}), temp {mem.temp_size_in_bytes / 1e6:.1f} MB")


# A partitioned module as XLA prints it, cut down: an async all-reduce in a layer loop of 5
# trips, a fusion it calls, and one all-gather after the loop.
_LOOPED_HLO = """HloModule jit_step, entry_computation_layout={(f32[4,8]{1,0})->f32[32,8]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add = f32[] add(%x, %y)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %h = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %all-reduce-start = f32[4,8]{1,0} all-reduce-start(%h), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%add
  %all-reduce-done = f32[4,8]{1,0} all-reduce-done(%all-reduce-start)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %all-reduce-done)
}

%cond (p.1: (s32[], f32[4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4,8]) -> f32[32,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(%zero, %a)
  %while = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %out = f32[4,8]{1,0} get-tuple-element(%while), index=1
  ROOT %all-gather = f32[32,8]{1,0} all-gather(%out), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
}
"""


def test_collectives_counted_per_loop_trip():
    """`hlo_cost.collectives` counts a loop body's collectives once per trip, an async pair
    once, and sizes each by its result; a loop of unknown trip count is an error."""
    assert hlo_cost.collectives(_LOOPED_HLO) == {
        "all-reduce": {"count": 5, "bytes": 5 * 4 * 8 * 4},
        "all-gather": {"count": 1, "bytes": 32 * 8 * 4}}
    ring = parallel.collective_seconds(hlo_cost.collectives(_LOOPED_HLO), 8, 1.0)
    assert ring == pytest.approx(2 * 7 / 8 * 5 * 128 + 7 / 8 * 1024)
    with pytest.raises(ValueError, match="known trip count"):
        hlo_cost.collectives(_LOOPED_HLO.replace('"known_trip_count":{"n":"5"}', "{}"))


def test_loop_corrected_cost_counts_trip_counts():
    """`loop_corrected_cost` counts a while loop's body as many times as it runs
    (XLA's own cost analysis counts it once)."""
    def looped(x, w):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ w), x)

    x, w = jnp.ones((8, 64)), jnp.ones((64, 64))
    text = jax.jit(looped).lower(x, w).compile().as_text()
    dot = 2 * 8 * 64 * 64
    assert hlo_cost._hlo_cost(text)["flops"] < 2 * dot
    assert 5 * dot <= hlo_cost.loop_corrected_cost(text)["flops"] < 6 * dot


def test_step_cost_counts_layers_and_drops_pool():
    """`step_cost`'s HLO bookkeeping on a CPU compile of the tiny step: every layer's
    matmuls counted, and no whole-pool bytes left."""
    cfg = ModelConfig("llama", 256, 64, 128, 4, 4, 2, 16, max_position_embeddings=256)
    b = step.Bucket.decode(8, max_model_len=256, num_blocks=4096)
    be = step.backend_for(None, "xla")
    specs = step.step_specs(cfg, b, backend=be, param_dtype=jnp.float32, kv_dtype=jnp.float32)
    text = step.lower_step(specs).compile().as_text()
    layered = hlo_cost.loop_corrected_cost(text)
    per_layer = 2 * 8 * (64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 64 * 256 + 128 * 64)
    lm_head = 2 * 8 * 64 * 256
    assert layered["flops"] >= 4 * per_layer + lm_head
    pool = step.pool_bytes(cfg, b, jnp.float32)
    shape = be.pool_shape(4, 4096, 16, 2, 16)
    rest = hlo_cost.cost_without_pool(text, shape, be.block_axis)
    assert rest["bytes accessed"] < pool / 10 < layered["bytes accessed"]


# --- scripts -----------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts" / "gpu").glob("*.py")))
def test_gpu_script_parses_help(script):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu" / script), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout
