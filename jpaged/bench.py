"""Offline throughput benchmark: replay a workload through `LLM.generate` and time it.

A workload is a JSON list of `{"prompt_token_ids": [...], "max_tokens": N}`; every
request generates exactly N tokens (`ignore_eos`), so engines compare on the same
work. `jpaged bench throughput` and `scripts/benchmark_throughput.py` both call
`throughput_benchmark`, so the numbers are those of the code users run.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

WARMUP_MODES = ("full", "none")


def load_workload(path: str | os.PathLike, num_requests: int | None = None) -> list[dict[str, Any]]:
    """Read and check a workload file; `num_requests` keeps the first K requests."""
    with open(path) as f:
        try:
            workload = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"workload {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(workload, list) or not workload:
        raise ValueError(f"workload {str(path)!r} must be a non-empty JSON list of "
                         '{"prompt_token_ids": [...], "max_tokens": N} objects')
    for i, req in enumerate(workload):
        ids = req.get("prompt_token_ids") if isinstance(req, dict) else None
        n = req.get("max_tokens") if isinstance(req, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"workload {str(path)!r}, request {i}: 'prompt_token_ids' must be a "
                             "non-empty list of integers")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"workload {str(path)!r}, request {i}: 'max_tokens' must be an "
                             f"integer >= 1, got {n!r}")
    if num_requests is not None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        workload = workload[:num_requests]
    return workload


def _params(workload, temperature: float, seed: int | None = None):
    from .sampling_params import SamplingParams
    return [SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=temperature,
                           seed=None if seed is None else seed + i)
            for i, r in enumerate(workload)]


def _shifted_prompts(workload, vocab_size: int) -> list[dict[str, list[int]]]:
    """The workload's prompts with every token id moved by one: the same lengths, so the
    same schedule and step shapes, but prompts no cache can recognise in the timed run."""
    return [{"prompt_token_ids": [(t + 1) % vocab_size for t in r["prompt_token_ids"]]}
            for r in workload]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_throughput(llm, workload: list[dict[str, Any]], *, temperature: float = 0.0,
                   warmup: str = "full", seed: int | None = 0, quiet: bool = False) -> dict[str, Any]:
    """Warm up, then time `llm.generate` over the whole workload (all requests queued at
    once, no progress bar). Returns the result dict (see `throughput_benchmark`)."""
    import jax
    if warmup not in WARMUP_MODES:
        raise ValueError(f"warmup must be one of {WARMUP_MODES}, got {warmup!r}")
    params = _params(workload, temperature, seed)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in workload]
    compilations_start = llm.num_compilations()
    warmup_s = 0.0
    if warmup == "full":
        _log(f"warm-up: {len(workload)} requests of the workload's shapes (untimed)", quiet)
        start = time.perf_counter()
        llm.generate(_shifted_prompts(workload, llm.model_config.vocab_size), params,
                     use_tqdm=not quiet)
        warmup_s = time.perf_counter() - start
    warmup_compilations = llm.num_compilations() - compilations_start

    for key in llm.stats:
        llm.stats[key] = type(llm.stats[key])(0)
    preemptions_before = llm.scheduler.num_preemptions
    compilations_before = llm.num_compilations()
    _log(f"timed run: {len(workload)} requests", quiet)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - start

    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in workload)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(r["max_tokens"] for r in workload)
    if output_tokens != expected:
        short = [o.request_id for o, r in zip(outputs, workload)
                 if len(o.outputs[0].token_ids) != r["max_tokens"]]
        raise RuntimeError(f"{len(short)} requests generated fewer tokens than their max_tokens "
                           f"({output_tokens} of {expected}); is prompt + max_tokens over "
                           f"max_model_len={llm.max_model_len}?")
    steps = llm.stats["steps"]
    kv = llm.kv_cache_stats()
    return {
        "requests": len(workload),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall_s,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall_s,
        "kv_utilization_peak": llm.stats["utilization_peak"],
        "kv_utilization_mean": llm.stats["utilization_sum"] / steps if steps else 0.0,
        "preemptions": llm.scheduler.num_preemptions - preemptions_before,
        "compilations": llm.num_compilations() - compilations_before,
        "steps": steps,
        "load_s": llm.load_s,
        "warmup": warmup,
        "warmup_s": warmup_s,
        "warmup_compilations": warmup_compilations,
        "temperature": temperature,
        "kv_cache_dtype": str(jax.tree_util.tree_leaves(llm.runner.kv_pool)[0].dtype),
        "kv_total_blocks": kv["total_blocks"],
        "kv_pool_bytes": kv["pool_bytes"],
        "block_size": llm.config.block_size,
        "max_num_seqs": llm.config.max_num_seqs,
        "max_num_batched_tokens": llm.config.max_num_batched_tokens,
        "max_model_len": llm.max_model_len,
        "attention_backend": getattr(llm.runner.backend, "name", llm.config.attention_backend),
    }


def hf_throughput(model_path, workload: list[dict[str, Any]], dtype: str, batch_size: int = 16,
                  quiet: bool = False) -> dict[str, Any]:
    """The same workload through transformers `generate`: static batches of `batch_size`
    requests in workload order, left padding, greedy, each batch generating the longest
    max_tokens in it. Output tokens count only each request's own max_tokens; the time is
    the whole batches' (what a static batcher pays)."""
    try:
        import torch
    except ImportError:
        raise RuntimeError("--baseline hf runs transformers in PyTorch, which is not installed: "
                           'pip install ".[bench]" (or torch==2.13.0 and accelerate)') from None
    from transformers import AutoModelForCausalLM

    from jpaged.models.loader import is_gguf, resolve_model_path

    if batch_size < 1:
        raise ValueError(f"hf batch size must be >= 1, got {batch_size}")
    torch.set_num_threads(os.cpu_count() or 1)
    path = resolve_model_path(model_path)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    _log(f"transformers baseline: loading {path.name} ({dtype})", quiet)
    start = time.perf_counter()
    if is_gguf(path):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    model.eval()
    load_s = time.perf_counter() - start
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        eos = model.generation_config.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) or 0

    def run(batch, new_tokens):
        width = max(len(r["prompt_token_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            p = r["prompt_token_ids"]
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
        assert out.shape[1] == width + new_tokens, (out.shape, width, new_tokens)

    run(workload[:1], 2)  # untimed: first-call initialisation
    batches = [workload[i:i + batch_size] for i in range(0, len(workload), batch_size)]
    from tqdm.auto import tqdm
    start = time.perf_counter()
    for batch in tqdm(batches, desc="transformers", unit="batch", disable=quiet, leave=False):
        run(batch, max(r["max_tokens"] for r in batch))
    wall_s = time.perf_counter() - start
    output_tokens = sum(r["max_tokens"] for r in workload)
    model = None  # free the weights before returning
    gc.collect()
    return {"hf_output_tokens_per_s": output_tokens / wall_s, "hf_wall_s": wall_s,
            "hf_load_s": load_s, "hf_batch_size": batch_size, "hf_torch_threads": torch.get_num_threads()}


def throughput_benchmark(workload_path, model=None, *, num_requests: int | None = None,
                         temperature: float = 0.0, warmup: str = "full", baseline: str | None = None,
                         hf_batch_size: int = 16, quiet: bool = False,
                         **engine_args) -> dict[str, Any]:
    """Load the engine, replay the workload (see `run_throughput`) and, with
    `baseline="hf"`, the same workload through transformers in this process afterwards.

    Keys: requests, prompt_tokens, output_tokens, wall_s, output_tokens_per_s,
    total_tokens_per_s, kv_utilization_peak / _mean (tokens stored / slots allocated,
    per step), preemptions and compilations (during the timed run), load_s, warmup_s,
    model, dtype, max_num_seqs, ...; with the baseline also hf_output_tokens_per_s and
    speedup_vs_hf (jpaged / transformers output tokens/s).
    """
    from jpaged.models.loader import resolve_model_path

    from .llm import LLM

    if baseline not in (None, "hf"):
        raise ValueError(f"baseline must be 'hf' or None, got {baseline!r}")
    workload = load_workload(workload_path, num_requests)
    path = resolve_model_path(model)
    _log(f"loading {path}", quiet)
    llm = LLM(str(path), **engine_args)
    _log(f"loaded in {llm.load_s:.1f} s", quiet)
    import jax
    dtype = str(jax.tree_util.tree_leaves(llm.params)[0].dtype)
    result = {"model": str(path), "dtype": dtype, "workload": str(workload_path)}
    result.update(run_throughput(llm, workload, temperature=temperature, warmup=warmup,
                                 seed=llm.config.seed, quiet=quiet))
    if baseline == "hf":
        del llm  # free the pool and weights before transformers loads its copy
        gc.collect()
        result.update(hf_throughput(path, workload, dtype, hf_batch_size, quiet))
        result["speedup_vs_hf"] = result["output_tokens_per_s"] / result["hf_output_tokens_per_s"]
    return result


def format_result(result: dict[str, Any]) -> str:
    """A human-readable summary of a `throughput_benchmark` result."""
    lines = [f"{result['requests']} requests, {result['prompt_tokens']} prompt + "
             f"{result['output_tokens']} output tokens in {result['wall_s']:.2f} s "
             f"({result['model']}, {result['dtype']})",
             f"  output tokens/s   {result['output_tokens_per_s']:.1f}",
             f"  total tokens/s    {result['total_tokens_per_s']:.1f}",
             f"  KV utilization    mean {result['kv_utilization_mean']:.3f}, "
             f"peak {result['kv_utilization_peak']:.3f}",
             f"  preemptions       {result['preemptions']}",
             f"  compilations      {result['compilations']} (timed run; "
             f"{result['warmup_compilations']} in warm-up)",
             f"  load / warm-up    {result['load_s']:.1f} s / {result['warmup_s']:.1f} s "
             f"(warmup={result['warmup']})"]
    if "hf_output_tokens_per_s" in result:
        lines.append(f"  transformers      {result['hf_output_tokens_per_s']:.1f} output tokens/s "
                     f"(batches of {result['hf_batch_size']}): jpaged is "
                     f"{result['speedup_vs_hf']:.2f}x")
    return "\n".join(lines)
