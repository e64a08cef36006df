"""The transformers baseline of `jpaged bench throughput --baseline hf`: the same workload
through transformers `generate` (PyTorch, the bench extra), in the same process."""
from __future__ import annotations

import gc
import os
import time
from typing import Any

from .workloads import log


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
    log(f"transformers baseline: loading {path.name} ({dtype})", quiet)
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
