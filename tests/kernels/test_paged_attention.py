"""Decode PagedAttention kernel (interpret mode) vs its jnp reference, the
reference vs naive dense NumPy attention, the kernel vs JAX's own Pallas
paged-attention op, and the K/V write."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from jpaged.pallas_kernels import (
    paged_attention,
    paged_attention_reference,
    write_kv,
    write_kv_reference,
)
from kernel_cases import (BF16, assert_close, check_kernel, dense_attention_numpy, layout_case,
                          random_paged_case, sweep, sweep_case)


# With kernel_cases.SHARED_DEFAULT, a small sweep where every page size, head ratio,
# head dim and dtype appears, and the decode kernel's own tunables.
@sweep([(32, 3, 1, 128, jnp.float16, {}),
        (16, 1, 1, 64, BF16, dict(num_partitions=5, pages_per_compute_block=2))])
def test_kernel_matches_reference(bs, kvh, group, d, dtype, tun):
    # The last context is 0: a padding row, exactly zero.
    check_kernel(paged_attention, paged_attention_reference, bs, kvh, group, d, dtype, tun,
                 pad_rows=1)


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_reference_matches_dense_numpy(dtype):
    c = sweep_case(7, 16, 2, 3, 64, dtype)
    ref = paged_attention_reference(**c)
    assert_close(ref, dense_attention_numpy(**c), dtype, "reference")


# Fixed shapes (one compile), random runtime data: context lengths, sharing,
# tables, partitions that end anywhere.
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    contexts=st.lists(st.integers(0, 64), min_size=5, max_size=5),
    share=st.booleans(),
)
def test_kernel_random_layouts(seed, contexts, share):
    c = layout_case(seed, contexts, share, num_blocks=48)
    out = paged_attention(**c, interpret=True, num_partitions=3, pages_per_compute_block=2)
    assert_close(out, dense_attention_numpy(**c), jnp.float32, "random")


def test_traced_layer_reads_only_that_layer():
    c = sweep_case(3, 16, 2, 2, 64, jnp.float32, contexts=[40, 7])
    f = jax.jit(
        lambda layer: paged_attention(
            c["q"],
            c["k_pages"],
            c["v_pages"],
            layer,
            c["block_tables"],
            c["context_lens"],
            interpret=True,
        )
    )
    for layer in (0, 1):
        ref = paged_attention_reference(**{**c, "layer": layer})
        assert_close(f(jnp.int32(layer)), ref, jnp.float32, f"layer {layer}")


def test_matches_jax_pallas_paged_attention():
    """Outside reference: jax.experimental.pallas.ops.gpu.paged_attention
    (per-layer pool, no softmax scale, pages_per_seq divisible by its
    k_splits), interpret mode, on our pool's layer slice."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa

    c = sweep_case(11, 16, 2, 4, 64, jnp.float32, contexts=[1, 17, 100, 0])
    layer = int(c["layer"])
    theirs = jax_pa.paged_attention(
        c["q"],
        c["k_pages"][layer],
        c["v_pages"][layer],
        c["block_tables"],
        c["context_lens"],
        block_h=16,
        pages_per_compute_block=1,
        k_splits=7,
        interpret=True,
    )
    ours = paged_attention(**c, scale=1.0, interpret=True)
    assert_close(ours, theirs, jnp.float32, "vs jax.experimental op")


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_write_kv(dtype):
    rng = np.random.default_rng(0)
    c = random_paged_case(
        rng,
        context_lens=[5],
        block_size=4,
        num_kv_heads=2,
        group=1,
        head_dim=16,
        dtype=dtype,
        num_layers=3,
    )
    kp, vp = c["k_pages"], c["v_pages"]
    num_slots = kp.shape[2] * kp.shape[3]
    slots = jnp.asarray([3, -1, num_slots - 1, 0, -7, 9], jnp.int32)
    k = jnp.asarray(rng.standard_normal((6, 2, 16)), dtype)
    v = jnp.asarray(rng.standard_normal((6, 2, 16)), dtype)
    for layer in (0, 2):
        got = jax.jit(write_kv)(kp, vp, jnp.int32(layer), k, v, slots)
        want = write_kv_reference(kp, vp, layer, k, v, slots)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_write_kv_is_in_place_when_donated():
    shape = (4, 8, 512, 16, 128)  # 128 MiB per float32 pool
    sd = jax.ShapeDtypeStruct
    compiled = (
        jax.jit(write_kv, donate_argnums=(0, 1))
        .trace(
            sd(shape, jnp.float32),
            sd(shape, jnp.float32),
            sd((), jnp.int32),
            sd((64, 8, 128), jnp.float32),
            sd((64, 8, 128), jnp.float32),
            sd((64,), jnp.int32),
        )
        .lower()
        .compile()
    )
    pool_bytes = np.prod(shape) * 4
    assert compiled.memory_analysis().temp_size_in_bytes < pool_bytes // 100
