"""The kernels on NVIDIA GPUs, proven without one.

1. Lowering for `cuda` works with plain (CPU) jaxlib: the StableHLO holds the
   Triton custom call with our kernel names, and a layer scan over the stacked
   pool never materializes a per-layer slice of it.
2. Deviceless ahead-of-time compilation for A100 (sm_80) and H100 (sm_90a)
   with the target configs in ../shared/gpu_targets: needs the CUDA plugin
   (`jax[cuda12-local]`, kept out of the main venv: see
   ../shared/gpu_targets/README.md); skipped with the reason when absent.
3. The GPU scripts import and parse `--help`.
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

from jpaged.pallas_kernels import paged_attention, ragged_paged_attention, write_kv

TRITON_CALL = "__gpu$xla.gpu.triton"
DECODE_NAME = "jpaged_paged_attention_decode"
RAGGED_NAME = "jpaged_ragged_paged_attention"
REPO = Path(__file__).resolve().parents[1]
TARGETS = Path(__file__).resolve().parents[2] / "shared" / "gpu_targets"
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

GPUS = {"a100": ("a100_sxm_80.txtpb", "sm_80", 164), "h100": ("h100_sxm.txtpb", "sm_90a", 227)}
# name: (num_seqs, num_tokens, layers, kv_heads, group, head_dim, blocks,
#        block_size, pages_per_seq): 64 sequences with 2048-token contexts,
# a 2048-token prefill bucket, bfloat16 (a 7B pool of 6144 blocks is 51 GB:
# what fits next to the weights on an 80 GB GPU).
MODELS = {
    "llama2-7b": (64, 2048, 32, 32, 1, 128, 6144, 16, 128),
    "small-gqa": (64, 2048, 30, 3, 3, 64, 8448, 16, 128),  # SmolLM2-135M-like
}


def _topology(gpu):
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        pytest.skip(
            "deviceless GPU compilation needs the CUDA plugin "
            "(pip install 'jax[cuda12-local]', in its own venv)"
        )
    path = TARGETS / GPUS[gpu][0]
    if not path.exists():
        pytest.skip(f"GPU target config {path} not found")
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        pytest.skip("set JAX_PLATFORMS=cpu (the CUDA plugin fails cuInit without a GPU)")
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        "jpaged", "cuda", target_config=path.read_text(), topology="1x1x1"
    )


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize(
    "model,kernel", [("llama2-7b", "decode"), ("llama2-7b", "ragged"), ("small-gqa", "decode")]
)
def test_deviceless_compile(gpu, model, kernel, tmp_path):
    topo = _topology(gpu)
    mesh = jax.sharding.Mesh(topo.devices, ("d",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
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
    arch = GPUS[gpu][1]
    assert re.search(rf"^\.target {arch}\b", text, re.M), "wrong architecture"
    assert "mma.sync" in text or "wgmma" in text, "dots not on tensor cores"
    # The launch fits the GPU's shared memory, and the step never copies the
    # pool (temporaries are the q/partial buffers, far below the pool's size).
    thunks = Path(glob.glob(str(tmp_path / "*thunk_sequence.txt"))[0]).read_text()
    smem = int(re.search(rf"{name} grid: .*shared_memory: (\d+) bytes", thunks).group(1))
    assert 0 < smem <= GPUS[gpu][2] * 1024
    pool_bytes = np.prod(specs[1].shape) * 2
    assert compiled.memory_analysis().temp_size_in_bytes < pool_bytes / 50
    launch = re.search(rf"{name} (grid: \[.*?\] threads: \[.*?\])", thunks).group(1)
    print(f"{gpu} {model} {kernel}: {arch}, {launch}, smem {smem} B")


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_deviceless_write_kv_in_place(gpu):
    """The bfloat16 K/V scatter into a donated 7B-sized pool: no copy."""
    topo = _topology(gpu)
    mesh = jax.sharding.Mesh(topo.devices, ("d",))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
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
