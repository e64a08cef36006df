"""The vLLM paper's evaluation (Kwon et al., SOSP 2023, section 6) on this engine: its
budgets and one function per kind of data point; `scripts/reproduce_paper.py` runs them,
keeps one JSON per point and draws the figures.

Memory binds as it does in the paper: the pool holds as many tokens, relative to the mean
request, as OPT-13B's KV cache on an A100-40GB does. The paper's Fig. 1 gives OPT-13B about
12 GB of KV cache there (of 40 GB: 26 GB of weights, the rest activations); a token's K and
V take 2 x 40 layers x 5,120 x 2 bytes = 800 KiB, so the pool holds 14,648 tokens: 29.4
mean ShareGPT requests (161 + 338 tokens), 188 mean Alpaca requests (19.3 + 58.5). A run
here gets a pool of that ratio times its own workload's mean request (the shipped workloads
have the paper's length statistics: about the same 14,648 tokens), in this model's bytes
(SmolLM2-135M, float32: 45 KiB a token, about 640 MiB). Like the paper's OPT, sequences are
capped at 2,048 tokens. Prefix caching is off in every run (the
paper's vLLM had none, and the baselines cannot share).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from jpaged.utils import kv_bytes_per_block

OPT13B_KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2
A100_KV_BYTES = 12e9  # the paper's Fig. 1: OPT-13B on an A100-40GB
PAPER_POOL_TOKENS = int(A100_KV_BYTES // OPT13B_KV_BYTES_PER_TOKEN)
PAPER_MAX_MODEL_LEN = 2048
PAPER_MEAN_REQUEST_TOKENS = {"sharegpt": 161 + 338, "alpaca": 19.3 + 58.5}  # section 6.1
POLICIES = ("paged", "orca-oracle", "orca-pow2", "orca-max", "static")
# The paper's results the figures are compared with.
PAPER = {
    "fig2_token_states": {"paged": (0.963, 0.963), "orca": (0.204, 0.382)},
    "fig12_rate_vs_orca_oracle": (1.7, 2.7),
    "fig12_rate_vs_orca_max": (2.7, 8.0),
    "fig18a_kernel_overhead": (0.20, 0.26),
}


def mean_request_tokens(workload: list[dict[str, Any]]) -> float:
    return float(np.mean([len(r["prompt_token_ids"]) + r["max_tokens"] for r in workload]))


def budget(workload: list[dict[str, Any]], kind: str, model_config, dtype: str = "float32") -> dict[str, Any]:
    """The KV pool for `workload` (of `kind` 'sharegpt' or 'alpaca'): as many tokens, relative
    to its mean request, as the paper's pool holds relative to the paper's mean request of
    that kind; in this model's bytes."""
    per_token = kv_bytes_per_block(model_config, 1, np.dtype(dtype))
    ratio = PAPER_POOL_TOKENS / PAPER_MEAN_REQUEST_TOKENS[kind]
    mean = mean_request_tokens(workload)
    tokens = int(ratio * mean)
    return {"pool_tokens": tokens, "kv_cache_memory": tokens * per_token,
            "kv_bytes_per_token": per_token, "mean_request_tokens": mean,
            "pool_to_request_ratio": ratio, "paper_pool_tokens": PAPER_POOL_TOKENS,
            "paper_mean_request_tokens": PAPER_MEAN_REQUEST_TOKENS[kind]}


def offline_sharing(llm, workload: list[dict[str, Any]], mode: str, width: int, seed: int = 0) -> dict:
    """Fig. 14: the whole workload queued at once with `width` parallel samples (random
    sampling) or beams per request; requests and output tokens per second and the mean
    batch size, on the engine as configured (block sharing on or off)."""
    from jpaged.sampling_params import BeamSearchParams, SamplingParams
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in workload]
    llm.stats.record_memory = False
    llm.stats.reset()
    copied = llm.stats.blocks_copied
    start = time.perf_counter()
    if mode == "parallel":
        params = [SamplingParams(n=width, temperature=1.0, seed=seed + i, max_tokens=r["max_tokens"],
                                 ignore_eos=True) for i, r in enumerate(workload)]
        llm.generate(prompts, params, use_tqdm=False)
    elif mode == "beam":
        ids = [llm.add_request(p, beam_params=BeamSearchParams(
            beam_width=width, max_tokens=r["max_tokens"], ignore_eos=True)) for p, r in zip(prompts, workload)]
        while any(i in llm.requests for i in ids):
            llm.step()
    else:
        raise ValueError(f"mode must be 'parallel' or 'beam', got {mode!r}")
    tokens = llm.stats.output_tokens  # every sample's and beam's tokens
    wall = time.perf_counter() - start
    return {"mode": mode, "width": width, "requests": len(workload), "wall_s": wall,
            "requests_per_s": len(workload) / wall, "output_tokens_per_s": tokens / wall,
            "mean_batch_size": llm.stats.mean_batch_size, "steps": llm.stats.steps,
            "blocks_copied": llm.stats.blocks_copied - copied,
            "enable_block_sharing": llm.config.enable_block_sharing}


def swap_vs_recompute(llm, num_tokens: int, repeats: int = 5) -> dict[str, float]:
    """Fig. 19a on an engine with `preemption_mode='swap'`: seconds to swap `num_tokens`
    tokens' blocks out to host memory and back in, against recomputing them (one prefill
    step of `num_tokens` tokens)."""
    from jpaged.sampling_params import SamplingParams
    bs = llm.config.block_size
    n = -(-num_tokens // bs)
    pairs = [(i, i) for i in range(n)]

    def timed(fn):
        fn()  # compile / first touch, untimed
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best
    out = timed(lambda: llm.runner.swap_out(pairs))
    back = timed(lambda: llm.runner.swap_in(pairs))
    prompt = {"prompt_token_ids": list(np.random.default_rng(0).integers(100, 30000, num_tokens))}
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    recompute = timed(lambda: llm.generate(prompt, one, use_tqdm=False))
    return {"block_size": bs, "tokens": num_tokens, "blocks": n, "swap_out_s": out,
            "swap_in_s": back, "swap_s": out + back, "recompute_s": recompute}
