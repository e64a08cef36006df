"""How many KV blocks a sequence holds before a step: the block manager's one swappable piece.

`OnDemandPolicy` (`paged`, the default) is vLLM's: a block is taken when the sequence's
tokens first reach it, so at most one block per sequence is partly empty.

The others are the vLLM paper's baselines (section 6.1), kept as benchmark baselines so that
the only difference between two runs is how KV memory is managed (`EngineConfig.kv_policy`).
Each reserves a sequence's whole space when it is admitted, as ONE contiguous run of block ids
(a contiguous allocator: a request can wait while enough blocks are free, scattered), and
never grows it:

- `orca-max`: `max_model_len` tokens (Orca without knowing output lengths);
- `orca-pow2`: the next power of two at or above prompt + true output length (Orca
  over-reserving by at most 2x);
- `orca-oracle`: exactly prompt + true output length;
- `static`: `orca-max`'s reservation; the scheduler admits a batch together and lets no
  request join it until all of it ends (FasterTransformer's batching).

The true output length is the request's `max_tokens` (the benchmark workloads generate every
request in full, `ignore_eos`). Reserving policies share no blocks (no copy-on-write forks, no
prefix caching): the systems they stand for have none.
"""
from __future__ import annotations

from jpaged.utils import cdiv

from .sequence import Sequence

KV_POLICIES = ("paged", "orca-max", "orca-pow2", "orca-oracle", "static")


def final_length(seq: Sequence, max_model_len: int) -> int:
    """Tokens `seq` holds when it ends: prompt + `max_tokens` (or up to `max_model_len`)."""
    max_tokens = seq.request.params.max_tokens
    if max_tokens is None:
        return max_model_len
    return min(seq.num_prompt_tokens + max_tokens, max_model_len)


class OnDemandPolicy:
    """vLLM's allocation: a sequence gets a block when its tokens first reach it."""

    name = "paged"
    reserves = False  # blocks come one at a time, from anywhere in the pool
    static_batches = False

    def __init__(self, block_size: int, max_model_len: int | None = None):
        self.block_size = block_size
        self.max_model_len = max_model_len

    def target_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq`'s table must hold before a step that leaves it with `num_tokens` tokens."""
        return cdiv(num_tokens, self.block_size)


class ReservePolicy(OnDemandPolicy):
    """Orca-style: the whole space (`reserved_tokens`) is taken, contiguous, at admission."""

    reserves = True

    def __init__(self, name: str, block_size: int, max_model_len: int):
        super().__init__(block_size, max_model_len)
        self.name = name
        self.static_batches = name == "static"

    def reserved_tokens(self, seq: Sequence) -> int:
        """Tokens of space `seq` reserves when it is admitted."""
        if self.name in ("orca-max", "static"):
            return self.max_model_len
        need = final_length(seq, self.max_model_len)
        if self.name == "orca-pow2":
            return min(1 << (need - 1).bit_length(), self.max_model_len)
        return need

    def target_blocks(self, seq: Sequence, num_tokens: int) -> int:
        return max(cdiv(self.reserved_tokens(seq), self.block_size), cdiv(num_tokens, self.block_size))


def make_policy(name: str, block_size: int, max_model_len: int) -> OnDemandPolicy:
    """The allocation policy called `name` (one of `KV_POLICIES`)."""
    if name == "paged":
        return OnDemandPolicy(block_size, max_model_len)
    if name not in KV_POLICIES:
        raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {name!r}")
    return ReservePolicy(name, block_size, max_model_len)
