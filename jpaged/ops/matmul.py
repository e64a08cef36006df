"""The packed-weight matmul of the CPU (`csrc/packed_matmul_cpu.cc`, an XLA FFI custom call).

XLA's CPU dots repack their weights on every call, which a step of few rows (decode) pays
in full: the weights stream at a third of the memory's bandwidth. So on the CPU the runner
packs each dense weight once, at load time, into panels of `PANEL` output columns,
[K, N] -> [N / PANEL, K, PANEL], and `packed_matmul` multiplies with them in the C++
kernel. A step of few rows reads each panel once, straight from memory, for all its rows;
many rows (prefill) go in cache-sized blocks of rows and slices of K. On a 2-core Zen 3, per
dot of SmolLM2's shapes inside a jitted chain of 30 (weights cold): 2.0-2.5x XLA's speed at
8-32 rows, 1.1-1.2x at 64-256, and 0.9-1.1x at 512-2048 rows (`docs/design.md`).

A tied embedding packs as the head it also is ([V, K] is already [N, K]) and looks tokens
up through `embedding_lookup`. float32 and bfloat16 weights pack as they are; the sums are
float32 either way, with x rounded to the weights' dtype first, as `jnp.dot` of
`x.astype(w.dtype)` does.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import build

SOURCE = Path(__file__).with_name("csrc") / "packed_matmul_cpu.cc"
TARGET = "jpaged_packed_matmul"
PANEL = 16  # output columns per panel; the kernel's kPanel


def packable(n: int) -> bool:
    """Whether a weight of `n` output columns packs (whole panels)."""
    return n > 0 and n % PANEL == 0


def pack(w):
    """[..., K, N] -> [..., N / PANEL, K, PANEL] (leading axes, such as stacked layers, kept)."""
    *lead, k, n = w.shape
    xp = np if isinstance(w, np.ndarray) else jnp
    return xp.swapaxes(w.reshape(*lead, k, n // PANEL, PANEL), -3, -2)


def pack_rows(e):
    """[..., N, K] (an embedding used as the head) -> [..., N / PANEL, K, PANEL]."""
    *lead, n, k = e.shape
    xp = np if isinstance(e, np.ndarray) else jnp
    return xp.swapaxes(e.reshape(*lead, n // PANEL, PANEL, k), -2, -1)


def unpack(wp):
    """The inverse of `pack`: [..., P, K, PANEL] -> [..., K, P * PANEL]."""
    *lead, p, k, panel = wp.shape
    xp = np if isinstance(wp, np.ndarray) else jnp
    return xp.swapaxes(wp, -3, -2).reshape(*lead, k, p * panel)


def embedding_lookup(wp, ids):
    """Rows `ids` of the [N, K] matrix that `pack_rows` packed into `wp`: [len(ids), K]."""
    return wp[ids // PANEL, :, ids % PANEL]


# load(): build (once per machine) and register the kernel; available(): None or why not.
load, available = build.ffi_library(SOURCE, "matmul kernel", {TARGET: "JpagedPackedMatmul"})


def packed_matmul_reference(x, wp, num_rows=None):
    """x [M, K] @ the packed weights wp [P, K, PANEL] -> f32 [M, P * PANEL], by XLA's dot;
    rows from `num_rows` on are zero."""
    y = jnp.einsum("mk,pkn->mpn", x.astype(wp.dtype), wp, preferred_element_type=jnp.float32)
    y = y.reshape(x.shape[0], -1)
    if num_rows is not None:
        y = jnp.where(jnp.arange(x.shape[0])[:, None] < num_rows, y, 0.0)
    return y


def packed_matmul(x, wp, use_kernel: bool = True, num_rows=None):
    """x [M, K] @ the packed weights wp [P, K, PANEL] -> f32 [M, P * PANEL]: the C++ kernel for
    float32 and bfloat16 weights, XLA's dot for other dtypes or with `use_kernel=False`.

    `num_rows` (an int32 scalar, traced or not; default M): the rows of x that are real, the
    rest padding. The kernel multiplies only those and writes zeros below them, so a step
    padded up to its bucket pays for its real tokens in the dense layers."""
    if not use_kernel or wp.dtype not in (jnp.float32, jnp.bfloat16):
        return packed_matmul_reference(x, wp, num_rows)
    load()
    x = x.astype(wp.dtype).astype(jnp.float32)  # the rounding jnp.dot(x.astype(w.dtype), w) does
    rows = jnp.asarray(x.shape[0] if num_rows is None else num_rows, jnp.int32).reshape(1)
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], wp.shape[0] * PANEL), jnp.float32))
    return call(x, wp, rows)
