"""Host-side inputs of one step: fixed-shape numpy arrays padded to buckets
(docs/design.md, "Buckets and compilation").

Token, sequence and query-length dimensions are rounded up to powers of two
(decode batches to multiples of 8, or one row, `decode_bucket`; prefill tokens
on the CPU also to 3/4 of one from 192 up, `token_bucket`),
and block tables are always `max_model_len / block_size` pages wide (attention
loops only over the pages in use), so the jitted step compiles for a small,
known set of shapes; `step_buckets` enumerates them for warm-up. Padding tokens
write to slot -1 (dropped) and padding sequences have context length 0.

Attention reads queries in tiles: rows of at most Q tokens of one sequence
(`query_grid`, `tile_seq`). A decode step has one tile per sequence (Q = 1); a
prefill step (Q = `PREFILL_TILE`, or N if less: one Q per token bucket keeps the
buckets few) cuts each sequence's new tokens into tiles of Q,
sorted by how far back they attend, so no work is spent on a [sequences,
longest prompt] grid of padding and rows that attend to few pages stop early.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from jpaged.attention.metadata import num_tiles
from jpaged.core.scheduler_output import SchedulerOutput
from jpaged.utils import cdiv, next_power_of_2


class StepInputs(NamedTuple):
    token_ids: np.ndarray  # i32[N] new tokens, packed sequence after sequence
    positions: np.ndarray  # i32[N]
    slot_mapping: np.ndarray  # i32[N] pool slot (block * block_size + offset) of each new token; -1 = padding
    block_tables: np.ndarray  # i32[B, P]
    context_lens: np.ndarray  # i32[B] tokens with K/V after this step (cached + new)
    query_start_loc: np.ndarray  # i32[B + 1] offsets of each sequence's tokens in the packed arrays
    query_grid: np.ndarray  # i32[R, Q] packed index of query j of tile r; N = padding
    grid_index: np.ndarray  # i32[N] flat index r * Q + j of each packed token in the grid
    logits_index: np.ndarray  # i32[B] packed index of each sequence's last new token (sampled)
    tile_seq: np.ndarray  # i32[R] sequence (row of block_tables) of each tile


PREFILL_TILE = 32  # queries per attention tile in prefill steps
FULL_ROWS_TOKENS = 512  # prefill steps of this many tokens or more have B = the most sequences


def bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """n padded to a power of two (at least `minimum`, at most `cap`)."""
    size = next_power_of_2(n, minimum)
    return min(size, cap) if cap else size


def token_bucket(n: int, fine: bool = False) -> int:
    """Tokens of a prefill step: n padded to a power of two (at least 16), or with `fine`
    to the ladder that also has 3/4 of each power of two from 256 up (192, 384, 768, 1536):
    padding then costs at most a third of the tokens instead of a half."""
    size = bucket(n, 16)
    return size * 3 // 4 if fine and size >= 256 and n <= size * 3 // 4 else size


def decode_bucket(num_seqs: int, single_row: bool = False) -> int:
    """Rows of a decode step: multiples of 8 up to 64, of 32 up to 256, then powers of two
    (as vLLM's CUDA-graph batch sizes), and with `single_row` 1 for a single stream. Padding
    rows cost their share of every matmul: 40 sequences in a 64-row step took 1.12x the time
    of a 40-row step."""
    if single_row and num_seqs <= 1:
        return 1
    for step, limit in ((8, 64), (32, 256)):
        if num_seqs <= limit:
            return max(step, cdiv(num_seqs, step) * step)
    return bucket(num_seqs)


class InputBuilder:
    def __init__(self, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, single_row_decode: bool = False, fine_token_buckets: bool = False):
        self.block_size = block_size
        self.fine_token_buckets = fine_token_buckets  # `token_bucket`'s finer ladder
        self.single_row_decode = single_row_decode  # a 1-row decode shape (`decode_bucket`)
        self.max_pages = cdiv(max_model_len, block_size)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens

    def shapes(self, batch: SchedulerOutput) -> tuple[int, int, int, int]:
        """(N tokens, B sequences, Q query length, P pages) buckets of a batch."""
        num_seqs = len(batch.seqs)
        P = self.max_pages
        if not batch.is_prefill:
            B = decode_bucket(num_seqs, self.single_row_decode)
            return B, B, 1, P
        N = token_bucket(batch.num_tokens, self.fine_token_buckets)
        return N, self.prefill_rows(N, num_seqs), min(PREFILL_TILE, N), P

    def prefill_rows(self, num_tokens: int, num_seqs: int) -> int:
        """B of a prefill step: a power of two, or for steps of `FULL_ROWS_TOKENS`+ tokens
        always the most sequences (their extra logits rows cost < 4% of such a step, and
        the buckets stay few: each compiles in about a second)."""
        if num_tokens >= FULL_ROWS_TOKENS:
            return bucket(self.max_num_seqs)
        return bucket(num_seqs)

    @staticmethod
    def shape_of(inputs: StepInputs) -> tuple[int, int, int, int]:
        """The (N, B, Q, P) bucket of built inputs."""
        return (inputs.token_ids.shape[0], *inputs.block_tables.shape[:1],
                inputs.query_grid.shape[1], inputs.block_tables.shape[1])

    def step_buckets(self) -> list[tuple[int, int, int, int]]:
        """Every (N, B, Q, P) the scheduler can produce under this configuration."""
        pages = [self.max_pages]
        seqs = sorted({decode_bucket(b, self.single_row_decode) for b in range(1, self.max_num_seqs + 1)})
        out = [(B, B, 1, P) for B in seqs for P in pages]
        tokens = sorted({token_bucket(n, self.fine_token_buckets)
                         for n in range(1, self.max_num_batched_tokens + 1)})
        for N in tokens:
            Q = min(PREFILL_TILE, N)
            for B, P in itertools.product(sorted({self.prefill_rows(N, b) for b in
                                                 range(1, min(N, self.max_num_seqs) + 1)}), pages):
                if Q <= P * self.block_size:
                    out.append((N, B, Q, P))
        return out

    def token_buckets(self) -> list[int]:
        """The token counts N a prefill step is padded up to (for the scheduler)."""
        return sorted({N for N, _, Q, _ in self.step_buckets() if Q > 1})

    @staticmethod
    def dummy(N: int, B: int, Q: int, P: int) -> StepInputs:
        """All-padding inputs of one bucket (warm-up): writes nothing, reads nothing."""
        z = np.zeros
        R = num_tiles(N, B, Q)
        return StepInputs(z(N, np.int32), z(N, np.int32), np.full(N, -1, np.int32), z((B, P), np.int32),
                          z(B, np.int32), z(B + 1, np.int32), np.full((R, Q), N, np.int32),
                          z(N, np.int32), z(B, np.int32), z(R, np.int32))

    def build(self, batch: SchedulerOutput) -> StepInputs:
        """Arrays for `batch`. Decode batches are first sorted by context length, longest
        first (in place), so that attention can skip the pages short rows don't have."""
        if not batch.is_prefill:
            batch.seqs.sort(key=lambda s: -s.num_computed_tokens)
        N, B, Q, P = self.shapes(batch)
        bs = self.block_size
        token_ids = np.zeros(N, np.int32)
        positions = np.zeros(N, np.int32)
        slot_mapping = np.full(N, -1, np.int32)
        block_tables = np.zeros((B, P), np.int32)
        context_lens = np.zeros(B, np.int32)
        query_start_loc = np.zeros(B + 1, np.int32)
        logits_index = np.zeros(B, np.int32)
        tiles = []  # (last position, sequence row, first packed index, length)
        t = 0
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            pos = np.arange(start, start + n, dtype=np.int32)
            token_ids[t:t + n] = seq.token_ids[start:start + n]
            positions[t:t + n] = pos
            table = np.asarray(seq.block_table, np.int32)
            slot_mapping[t:t + n] = table[pos // bs] * bs + pos % bs
            block_tables[b, :len(table)] = table
            context_lens[b] = start + n
            tiles += [(start + min(j + Q, n) - 1, b, t + j, min(Q, n - j)) for j in range(0, n, Q)]
            logits_index[b] = t + n - 1
            t += n
            query_start_loc[b + 1] = t
        query_start_loc[len(batch.seqs) + 1:] = t
        R = num_tiles(N, B, Q)
        query_grid = np.full((R, Q), N, np.int32)
        grid_index = np.zeros(N, np.int32)
        tile_seq = np.zeros(R, np.int32)
        if batch.is_prefill:  # longest reach first: a group of tiles loops as far as its first
            tiles.sort(key=lambda tile: -tile[0])
        for r, (_, b, first, n) in enumerate(tiles):
            query_grid[r, :n] = np.arange(first, first + n)
            grid_index[first:first + n] = r * Q + np.arange(n)
            tile_seq[r] = b
        return StepInputs(token_ids, positions, slot_mapping, block_tables, context_lens,
                          query_start_loc, query_grid, grid_index, logits_index, tile_seq)
