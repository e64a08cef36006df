"""What the sampler reads and returns: per-row sampling parameters (built here on the host,
as numpy arrays padded to the sampler's rows), the static mode that picks the compiled
sampler variant, how many rows it runs at, and the sampled tokens with their logprobs (and
the step's prompt logprobs, `PromptLogprobs`)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jpaged.core.scheduler_output import SchedulerOutput
from jpaged.sampling_params import SamplingParams


class SamplingTensors(NamedTuple):
    temperature: jax.Array          # f32[B]; < GREEDY_EPS => greedy
    top_k: jax.Array                # i32[B]; <= 0 => disabled
    top_p: jax.Array                # f32[B]; >= 1 => disabled
    min_p: jax.Array                # f32[B]; <= 0 => disabled
    repetition_penalty: jax.Array   # f32[B]; 1 => disabled (prompt or output tokens)
    presence_penalty: jax.Array     # f32[B]; 0 => disabled (output tokens)
    frequency_penalty: jax.Array    # f32[B]; 0 => disabled (output token counts)
    seed: jax.Array                 # u32[B] or i32[B]
    step: jax.Array                 # i32[B]: output index of the token being sampled
    output_counts: jax.Array | None = None  # f32[B, V]
    prompt_mask: jax.Array | None = None    # bool[B, V]
    banned: jax.Array | None = None         # bool[B, V]: tokens a row may not sample (min_tokens)
    # bool[B]: rows whose logprobs stay raw_logprobs whatever the mode (beam search, which
    # ranks by them); present with any logprobs_mode but raw_logprobs
    raw_rows: jax.Array | None = None


class SamplerMode(NamedTuple):
    """What changes the sampler's shapes or code; greedy, sampled and filtered rows are all
    run-time."""
    use_penalties: bool  # [B, V] penalty tensors (penalties, or rows short of min_tokens)
    num_logprobs: int    # top logprobs returned per row (0: only the sampled token's)
    logprobs_mode: str = "raw_logprobs"  # what the logprobs hold (EngineConfig.logprobs_mode)


class PromptLogprobs(NamedTuple):
    """Raw logprobs at prompt positions, one row per position asked for: of the prompt token
    that follows it, and the top K there."""
    token_logprobs: jax.Array  # f32[M]
    token_ranks: jax.Array     # i32[M]: 1 + the tokens more likely (ties count, as vLLM)
    top_ids: jax.Array         # i32[M, K]
    top_logprobs: jax.Array    # f32[M, K]


class SamplerOutput(NamedTuple):
    token_ids: jax.Array            # i32[B]
    logprobs: jax.Array             # f32[B]
    top_ids: jax.Array | None       # i32[B, K]
    top_logprobs: jax.Array | None  # f32[B, K]
    # the step's prompt logprobs (`ModelRunner.execute`'s `prompt_rows`, in their order)
    prompt_logprobs: PromptLogprobs | None = None


def sampler_mode(params: list[SamplingParams], in_min_tokens: bool, max_logprobs: int,
                 logprobs_mode: str = "raw_logprobs") -> SamplerMode:
    """The compiled sampler variant a batch of requests needs. `in_min_tokens`: some row is
    still short of its min_tokens (EOS and stop tokens banned: the penalty path)."""
    want = any(p.logprobs for p in params)  # logprobs=0: only the sampled token's
    return SamplerMode(use_penalties=any(p.uses_penalties for p in params) or in_min_tokens,
                       num_logprobs=max_logprobs if want else 0, logprobs_mode=logprobs_mode)


def sampler_modes(max_logprobs: int, logprobs_mode: str = "raw_logprobs") -> list[SamplerMode]:
    """Every mode a request can need."""
    return [SamplerMode(pen, lp, logprobs_mode) for pen in (False, True) for lp in (0, max_logprobs)]


def sampler_rows(num_rows: int, mode: SamplerMode, max_rows: int) -> int:
    """Rows the sampler runs at for a step of `num_rows` (the step's logits padded to them):
    1, else powers of two from 8 up to `max_rows` (the most a step has), so that a handful
    of sampler executables serve every step bucket (each compiles in ~2 s). Penalties and
    logprobs, rarer, run at 8 or `max_rows` rows."""
    rare = mode.use_penalties or mode.num_logprobs
    if num_rows <= 1 and not rare:
        return 1
    if num_rows <= 8:
        return min(8, max_rows)
    if rare:
        return max_rows
    return min(1 << (num_rows - 1).bit_length(), max_rows)


def batch_sampler_mode(batch: SchedulerOutput, max_logprobs: int,
                       logprobs_mode: str = "raw_logprobs") -> SamplerMode:
    """The mode a scheduled batch needs (`sampler_mode` of its requests)."""
    in_min_tokens = any(seq.num_output_tokens < seq.request.params.min_tokens for seq in batch.seqs)
    return sampler_mode([s.request.params for s in batch.seqs], in_min_tokens, max_logprobs,
                        logprobs_mode)


def dummy_sampling_tensors(num_rows: int, vocab_size: int, mode: SamplerMode) -> SamplingTensors:
    """Greedy padding rows with the shapes and dtypes `build_sampling_tensors` gives for
    `mode` (warm-up and compile checks: the same executable)."""
    z = np.zeros
    pen = mode.use_penalties
    return SamplingTensors(z(num_rows, np.float32), z(num_rows, np.int32), np.ones(num_rows, np.float32),
                           z(num_rows, np.float32), np.ones(num_rows, np.float32),
                           z(num_rows, np.float32), z(num_rows, np.float32), z(num_rows, np.uint32),
                           z(num_rows, np.int32),
                           z((num_rows, vocab_size), np.float32) if pen else None,
                           z((num_rows, vocab_size), np.bool_) if pen else None,
                           z((num_rows, vocab_size), np.bool_) if pen else None,
                           z(num_rows, np.bool_) if mode.logprobs_mode != "raw_logprobs" else None)


def build_sampling_tensors(batch: SchedulerOutput, num_rows: int, vocab_size: int,
                           mode: SamplerMode, eos_token_ids=()) -> SamplingTensors:
    """Per-row sampling parameters (numpy, padded to `num_rows`) for `mode`."""
    temperature = np.zeros(num_rows, np.float32)
    top_k = np.zeros(num_rows, np.int32)
    top_p = np.ones(num_rows, np.float32)
    min_p = np.zeros(num_rows, np.float32)
    rep = np.ones(num_rows, np.float32)
    presence = np.zeros(num_rows, np.float32)
    frequency = np.zeros(num_rows, np.float32)
    seed = np.zeros(num_rows, np.uint32)
    step = np.zeros(num_rows, np.int32)
    params = [s.request.params for s in batch.seqs]
    # Before min_tokens, EOS and stop tokens are banned: a [B, V] mask, so the penalty path.
    min_tokens_rows = [b for b, (seq, p) in enumerate(zip(batch.seqs, params))
                       if seq.num_output_tokens < p.min_tokens]
    use_penalties = mode.use_penalties
    counts = np.zeros((num_rows, vocab_size), np.float32) if use_penalties else None
    prompt_mask = np.zeros((num_rows, vocab_size), np.bool_) if use_penalties else None
    banned = np.zeros((num_rows, vocab_size), np.bool_) if use_penalties else None
    for b in min_tokens_rows:
        p = params[b]
        ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
        banned[b, [i for i in ids if 0 <= i < vocab_size]] = True
    for b, (seq, p) in enumerate(zip(batch.seqs, params)):
        temperature[b] = p.temperature
        top_k[b] = max(p.top_k, 0)
        top_p[b], min_p[b] = p.top_p, p.min_p
        rep[b], presence[b], frequency[b] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        seed[b] = seq.seed & 0xFFFFFFFF
        step[b] = seq.num_output_tokens
        if use_penalties:
            np.add.at(counts[b], np.asarray(seq.output_token_ids, np.int64), 1.0)
            prompt_mask[b, seq.token_ids[:seq.num_prompt_tokens]] = True
    raw_rows = None
    if mode.logprobs_mode != "raw_logprobs":  # beam search ranks by raw logprobs
        raw_rows = np.zeros(num_rows, np.bool_)
        raw_rows[:len(batch.seqs)] = [seq.request.beam is not None for seq in batch.seqs]
    return SamplingTensors(temperature, top_k, top_p, min_p, rep, presence, frequency, seed, step,
                           counts, prompt_mask, banned, raw_rows)
