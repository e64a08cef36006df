"""What attention reads besides q and the pool: one standalone pytree per step.

The runner's input builder fills it (as numpy, padded to buckets); every backend reads
the same fields. Queries come in tiles: rows of at most Q tokens of one sequence
(`query_grid`, `tile_seq`), one per sequence in a decode step, `PREFILL_TILE`-token
pieces of prompts in a prefill step (`runner/input_builder.py`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax

from jpaged.utils import cdiv

TILE_GROUP = 16  # prefill tiles per attention loop (each loops over its own longest context)


class AttentionMetadata(NamedTuple):
    slot_mapping: jax.Array  # i32[N] pool slot of each new token; -1 = padding (dropped)
    block_tables: jax.Array  # i32[B, P]
    context_lens: jax.Array  # i32[B] tokens with K/V after this step
    query_start_loc: jax.Array  # i32[B + 1] offsets of each sequence's tokens in the packed arrays
    query_grid: jax.Array  # i32[R, Q] query tiles: packed token indices, N = padding
    grid_index: jax.Array  # i32[N] flat index r * Q + j of each packed token in the grid
    tile_seq: jax.Array  # i32[R] sequence of each tile
    positions: jax.Array  # i32[N]

    @classmethod
    def from_inputs(cls, inputs) -> "AttentionMetadata":
        """From the input builder's `StepInputs` (numpy or device arrays alike)."""
        return cls(inputs.slot_mapping, inputs.block_tables, inputs.context_lens,
                   inputs.query_start_loc, inputs.query_grid, inputs.grid_index,
                   inputs.tile_seq, inputs.positions)


def num_tiles(N: int, B: int, Q: int) -> int:
    """Rows of the query grid: decode, one per sequence; prefill, enough tiles of Q for any
    split of N tokens among B sequences (each sequence wastes at most one partial tile),
    rounded up to whole groups of TILE_GROUP."""
    if Q == 1:
        return B
    rows = min(N // Q + B, N)
    return rows if rows <= TILE_GROUP else cdiv(rows, TILE_GROUP) * TILE_GROUP
