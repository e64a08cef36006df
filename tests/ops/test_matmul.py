"""The packed-weight CPU matmul (jpaged/ops/matmul.py) against XLA's dot on the unpacked
weights: shapes that cover the kernel's row tiles, its blocks of rows and slices of K, and
both weight dtypes; the packing helpers; the model with packed weights against unpacked."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.ops import matmul

pytestmark = pytest.mark.skipif(matmul.available() is not None,
                                reason=f"the C++ matmul kernel does not build here: {matmul.available()}")


def _case(rng, M, K, N, dtype):
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), dtype)
    return x, w


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M,K,N", [
    (1, 64, 16), (5, 64, 32), (6, 64, 48), (7, 33, 16),  # a partial tile, odd K
    (13, 576, 960), (64, 1536, 576),  # decode rows of SmolLM2's shapes
    (145, 300, 64), (300, 257, 80),  # more than one block of rows, partial slices of K
    (1000, 600, 32),
    (512, 576, 256), (150, 576, 48),  # rows and panels split evenly over the threads; few panels
])
def test_kernel_matches_xla_dot(M, K, N, dtype):
    rng = np.random.default_rng(M * 1000 + K + N)
    x, w = _case(rng, M, K, N, dtype)
    want = jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    got = jax.jit(matmul.packed_matmul)(x, matmul.pack(w))
    assert got.shape == (M, N) and got.dtype == jnp.float32
    # Both sum exactly rounded products in float32, in other orders.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    ref = matmul.packed_matmul(x, matmul.pack(w), use_kernel=False)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("M,rows", [(192, 138), (512, 400), (64, 5), (16, 0), (8, 8), (8, 20), (7, -3)])
def test_kernel_multiplies_only_the_real_rows(M, rows):
    """`num_rows` (traced, as the model passes a step's real token count): rows below it
    are x @ w, rows from it on are zero (padding: never multiplied, never garbage); a count
    past M is M, a negative one 0; XLA's reference path does the same."""
    rng = np.random.default_rng(M + rows)
    x, w = _case(rng, M, 576, 160, "float32")
    x = x.at[min(max(rows, 0), M):].set(jnp.nan)  # padding rows, whatever they hold, stay out
    got = np.asarray(jax.jit(matmul.packed_matmul)(x, matmul.pack(w), num_rows=jnp.int32(rows)))
    real = min(max(rows, 0), M)
    want = np.asarray(jnp.dot(x[:real], w, preferred_element_type=jnp.float32))
    np.testing.assert_allclose(got[:real], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got[real:], 0.0)
    ref = np.asarray(matmul.packed_matmul(jnp.nan_to_num(x), matmul.pack(w), use_kernel=False, num_rows=rows))
    np.testing.assert_allclose(ref, got, rtol=1e-4, atol=1e-4)


def test_kernel_rounds_x_to_bfloat16_weights_dtype():
    """With bfloat16 weights x is rounded to bfloat16 first, as jnp.dot(x.astype(w.dtype), w):
    a row that bfloat16 cannot hold exactly gives XLA's answer, not the float32 one."""
    x = jnp.full((1, 16), 1.0 + 2.0 ** -10, jnp.float32)  # not a bfloat16
    w = jnp.ones((16, 16), jnp.bfloat16)
    got = np.asarray(matmul.packed_matmul(x, matmul.pack(w)))
    np.testing.assert_array_equal(got, np.full((1, 16), 16.0, np.float32))


def test_kernel_with_zero_rows_or_zero_k():
    w = matmul.pack(jnp.ones((8, 32), jnp.float32))
    assert matmul.packed_matmul(jnp.ones((0, 8)), w).shape == (0, 32)
    np.testing.assert_array_equal(np.asarray(matmul.packed_matmul(jnp.ones((3, 0)), jnp.ones((2, 0, 16)))),
                                  np.zeros((3, 32), np.float32))


def test_kernel_rejects_mismatched_k():
    with pytest.raises(Exception, match="K differs"):
        jax.block_until_ready(matmul.packed_matmul(jnp.ones((2, 8)), jnp.ones((1, 9, 16))))


def test_pack_helpers_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 48)).astype(np.float32)  # stacked layers keep their axis
    packed = matmul.pack(w)
    assert packed.shape == (3, 3, 40, 16)
    np.testing.assert_array_equal(packed[1, 2, 7], w[1, 7, 32:48])
    np.testing.assert_array_equal(matmul.unpack(packed), w)
    np.testing.assert_array_equal(np.asarray(matmul.unpack(matmul.pack(jnp.asarray(w)))), w)
    e = rng.standard_normal((64, 24)).astype(np.float32)  # an embedding [V, K]
    rows = matmul.pack_rows(e)
    np.testing.assert_array_equal(matmul.unpack(rows), e.T)
    ids = jnp.asarray([0, 17, 63, 17])
    np.testing.assert_array_equal(np.asarray(matmul.embedding_lookup(jnp.asarray(rows), ids)), e[[0, 17, 63, 17]])
    assert matmul.packable(48) and not matmul.packable(40) and not matmul.packable(0)
