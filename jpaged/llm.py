"""The engine and its vLLM-shaped API: `LLM(model).generate(prompts, params)`.

Each `step()` runs request -> scheduler -> block manager -> input builder ->
model runner (jitted forward + sampling) and then, on the host, appends the
sampled tokens, detokenizes incrementally, checks stop conditions and frees
finished sequences' blocks.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jpaged.models import model_class
from jpaged.models.llama import stack_layers, unstack_layers
from jpaged.models.config import ModelConfig

from .attention import get_backend
from .block_manager import BlockManager
from .config import GiB, EngineConfig
from .detokenizer import DetokState, detokenize_incrementally
from .input_builder import InputBuilder, build_sampling
from .kv_blocks import HostKVPool
from .model_runner import ModelRunner, enable_compilation_cache, kv_bytes_per_block, num_step_compilations
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Sequence, SequenceStatus

PromptType = str | dict[str, Any] | list[int]


def default_kv_cache_memory() -> int:
    """2 GiB, or a quarter of the machine's memory if that is less."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * GiB
    return min(2 * GiB, total // 4)


def available_memory() -> int | None:
    """Bytes the OS can still give this process (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class LLM:
    """The engine. `model`: None (the embedded SmolLM2-135M-Instruct), a path to a
    Hugging Face folder or a .gguf file, or an in-memory Flax model (then pass
    `params=` and `tokenizer=`). Other keyword arguments: `EngineConfig` fields."""

    def __init__(self, model=None, *, params=None, tokenizer=None, **engine_args):
        self.config = config = EngineConfig(**engine_args)
        enable_compilation_cache(config.compilation_cache_dir)
        start = time.perf_counter()
        backend = get_backend(config.attention_backend)
        dtype = config.dtype if config.dtype != "auto" else (
            "float32" if jax.default_backend() == "cpu" else "bfloat16")
        if isinstance(model, ModelConfig):
            raise TypeError("pass a Flax model instance (e.g. LlamaForCausalLM(config, backend)), "
                            "not a ModelConfig")
        if hasattr(model, "apply") and hasattr(model, "config"):  # in-memory Flax model
            if params is None or tokenizer is None:
                raise ValueError("an in-memory model needs params= and tokenizer=")
            model_config = model.config
            module = model.clone(backend=backend)
            params = params.get("params", params)
            self.model_path = None
        else:
            from jpaged.models.loader import load_config, load_params, load_tokenizer, resolve_model_path
            path = resolve_model_path(model)
            self.model_path = str(path)  # the file or folder loaded (None: an in-memory model)
            model_config = load_config(path)
            tokenizer = tokenizer or load_tokenizer(path)
            params = load_params(path, model_config, dtype)
            module = model_class(model_config.model_type)(model_config, backend, jnp.dtype(dtype))
        if not hasattr(module, "scan_layers"):
            if config.scan_layers is not None:
                raise ValueError(f"scan_layers={config.scan_layers} needs a model with a `scan_layers` "
                                 f"field; {type(module).__name__} has none")
        else:
            if config.scan_layers is not None:
                module = module.clone(scan_layers=config.scan_layers)
            params = (stack_layers if module.scan_layers else unstack_layers)(params, model_config.num_layers)
        self.params = jax.device_put(params)
        self.tokenizer = tokenizer
        self.model_config = model_config
        kv_dtype = config.kv_cache_dtype if config.kv_cache_dtype != "auto" else (
            "float32" if jax.default_backend() == "cpu" else jax.tree_util.tree_leaves(self.params)[0].dtype)
        kv_dtype = jnp.dtype(kv_dtype)

        limit = model_config.max_position_embeddings
        if model_config.sliding_window:
            limit = min(limit, model_config.sliding_window)  # no sliding-window attention: stay inside it
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context "
                             f"length {limit}")
        budget = config.kv_cache_memory or default_kv_cache_memory()
        available = available_memory()
        if jax.default_backend() == "cpu" and available is not None and budget > available:
            raise ValueError(f"kv_cache_memory={budget} bytes is more than the {available} bytes of "
                             f"memory available after loading the weights: lower kv_cache_memory")
        per_block = kv_bytes_per_block(model_config, config.block_size, kv_dtype)
        num_blocks = budget // per_block
        if num_blocks * config.block_size < self.max_model_len:
            need = -(-self.max_model_len // config.block_size) * per_block
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds {num_blocks * config.block_size} tokens "
                f"({per_block} bytes per block of {config.block_size}), fewer than one request of "
                f"max_model_len={self.max_model_len}: raise kv_cache_memory to at least {need} "
                f"bytes or lower max_model_len")
        self.runner = ModelRunner(module, self.params, model_config, backend, num_blocks,
                                  config.block_size, kv_dtype)
        num_host_blocks = config.swap_space // per_block if config.preemption_mode == "swap" else 0
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          num_host_blocks)
        self.host_pool = HostKVPool(self.runner.kv_pool, num_host_blocks, backend.block_axis)
        self.scheduler = Scheduler(config, self.block_manager)
        self.input_builder = InputBuilder(config.block_size, config.max_num_seqs,
                                          config.max_num_batched_tokens, self.max_model_len)
        eos = set(model_config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.requests: dict[str, Request] = {}
        self._request_counter = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.stats = {"steps": 0, "prefill_tokens": 0, "output_tokens": 0, "utilization_sum": 0.0,
                      "utilization_peak": 0.0}
        self.load_s = time.perf_counter() - start

    # ---- requests -------------------------------------------------------------------------

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
            text = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
        elif isinstance(prompt, dict) and "prompt" in prompt:
            return self._tokenize(prompt["prompt"])
        elif isinstance(prompt, (list, tuple)):
            ids, text = prompt, None
        else:
            raise TypeError(f"a prompt must be a string, a list of token ids or a dict with "
                            f"'prompt_token_ids', got {type(prompt).__name__}")
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("prompt is empty: it must have at least one token")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary "
                             f"[0, {self.model_config.vocab_size}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is "
                             f"{self.max_model_len}, which must leave room for one output token")
        return text, ids

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue one request; raises ValueError/TypeError before touching any state."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        return self._add_tokenized(text, ids, params, request_id)

    def _add_tokenized(self, text, ids, params, request_id=None) -> str:
        request_id = request_id if request_id is not None else str(next(self._request_counter))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        if params.best_of > self.config.max_num_seqs:  # its samples run together
            raise ValueError(f"best_of (or n) = {params.best_of} exceeds max_num_seqs="
                             f"{self.config.max_num_seqs}")
        request = Request(request_id, text, ids, params, time.monotonic())
        base_seed = params.seed if params.seed is not None else int(self._rng.integers(2**31))
        for i in range(params.best_of):
            seq = Sequence(request, list(ids), len(ids), index=i,
                           seed=(base_seed * 1_000_003 + i) & 0x7FFFFFFF if i else base_seed)
            seq.detok_state = DetokState()
            seq.logprobs = [] if params.logprobs is not None else None
            request.seqs.append(seq)
        # The other samples are forked from the first when its prompt is prefilled: they
        # share the prompt's blocks (copy-on-write) and sample from its logits.
        request.seqs[0].pending_forks = request.seqs[1:]
        self.scheduler.add(request.seqs[0])
        self.requests[request_id] = request
        return request_id

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                self.scheduler.remove(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return outputs of the requests it advanced."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        self._apply_block_ops(batch)
        if not batch.seqs:  # only swaps this step
            return []
        inputs = self.input_builder.build(batch)
        sampling, mode = build_sampling(batch, len(inputs.logits_index), self.model_config.vocab_size,
                                        self.config.max_logprobs, self.eos_token_ids)
        out = self.runner.execute(inputs, sampling, mode)
        touched: dict[str, Request] = {}
        beams = {}
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += n
            if batch.is_prefill and b >= batch.num_decode:
                self.stats["prefill_tokens"] += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk that samples nothing yet
            if seq.request.beam is not None:  # beam search picks its tokens per request
                seq.request.beam.receive(seq, out, b)
                beams[seq.request.request_id] = seq.request.beam
                continue
            self._append_token(seq, out, b)
            touched[seq.request.request_id] = seq.request
        for beam in beams.values():
            beam.advance(self)
        self._record_utilization()
        results = []
        for request in touched.values():
            for seq in request.seqs:
                if seq.finished and seq.block_table:
                    self.scheduler.remove(seq)
            results.append(self._request_output(request))
            if request.finished:
                del self.requests[request.request_id]
        return results

    def _apply_block_ops(self, batch) -> None:
        """Swaps and copy-on-write copies the scheduler asked for, before the step runs."""
        if batch.blocks_to_swap_in:
            host, dev = zip(*batch.blocks_to_swap_in)
            self.runner.swap_in(dev, *self.host_pool.load(host))
        if batch.blocks_to_swap_out:
            dev, host = zip(*batch.blocks_to_swap_out)
            self.host_pool.store(host, self.runner.swap_out(dev))
        if batch.blocks_to_copy:
            src, dst = zip(*batch.blocks_to_copy)
            self.runner.copy_blocks(src, dst)
        self.stats["blocks_copied"] = self.stats.get("blocks_copied", 0) + len(batch.blocks_to_copy)
        self.stats["blocks_swapped"] = self.stats.get("blocks_swapped", 0) + \
            len(batch.blocks_to_swap_in) + len(batch.blocks_to_swap_out)

    def _append_token(self, seq: Sequence, out, row: int) -> None:
        params = seq.request.params
        token = int(out.token_ids[row])
        seq.token_ids.append(token)
        seq.cumulative_logprob += float(out.logprobs[row])
        self.stats["output_tokens"] += 1
        if seq.logprobs is not None:
            entry = {token: Logprob(float(out.logprobs[row]))}
            top = zip(out.top_ids[row][:params.logprobs], out.top_logprobs[row][:params.logprobs]) \
                if params.logprobs else ()
            for rank, (tid, lp) in enumerate(top, 1):
                entry.setdefault(int(tid), Logprob(float(lp)))
                entry[int(tid)].rank = rank
            seq.logprobs.append(entry)
        seq.text += detokenize_incrementally(self.tokenizer, seq.output_token_ids, seq.detok_state,
                                             params.skip_special_tokens)
        n_out = seq.num_output_tokens
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                self._finish(seq, "stop", token)
            elif not params.ignore_eos and token in self.eos_token_ids:
                self._finish(seq, "stop", None)
            elif params.stop and self._check_stop_strings(seq, params):
                return
        if not seq.finished and ((params.max_tokens is not None and n_out >= params.max_tokens)
                                 or seq.num_tokens >= self.max_model_len):
            self._finish(seq, "length", None)

    def _check_stop_strings(self, seq: Sequence, params: SamplingParams) -> bool:
        for stop in params.stop:
            at = seq.text.find(stop, max(0, len(seq.text) - len(stop) - 64))
            if at >= 0:
                seq.text = seq.text[:at + len(stop)] if params.include_stop_str_in_output else seq.text[:at]
                self._finish(seq, "stop", stop)
                return True
        return False

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _record_utilization(self) -> None:
        used = self.block_manager.num_used_blocks
        util = self.kv_cache_stats()["utilization"] if used else 0.0
        self.stats["steps"] += 1
        self.stats["utilization_sum"] += util
        self.stats["utilization_peak"] = max(self.stats["utilization_peak"], util)

    def _request_output(self, request: Request) -> RequestOutput:
        seqs = request.seqs
        if request.finished and request.params.best_of > request.params.n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:request.params.n]
        outs = [CompletionOutput(i if len(seqs) < len(request.seqs) else s.index, s.text,
                                 list(s.output_token_ids), s.cumulative_logprob,
                                 s.logprobs, s.finish_reason, s.stop_reason)
                for i, s in enumerate(seqs)]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             request.finished)

    # ---- the batch API --------------------------------------------------------------------

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        tokenized = [self._tokenize(p) for p in prompts]  # every prompt checked before any is queued
        ids = [self._add_tokenized(text, toks, sp) for (text, toks), sp in zip(tokenized, sampling_params)]
        return self._run_to_completion(ids, use_tqdm)

    def _run_to_completion(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req")
        try:
            while len(results) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for request_id in ids:  # leave no half-finished request holding blocks
                self.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True):
        """`messages`: one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.tokenizer.apply_chat_template(
            conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            tokenize=True, return_dict=False)} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def warmup(self, sampling_params: Seq[SamplingParams] = (SamplingParams(temperature=0.0),),
               buckets=None, use_tqdm: bool = True) -> float:
        """Compile the step for every bucket this configuration can produce (or `buckets`),
        for the sampler modes of `sampling_params`. Returns the seconds it took."""
        from .scheduler import ScheduledBatch
        start = time.perf_counter()
        buckets = buckets if buckets is not None else self.input_builder.step_buckets()
        dummy_seq = Sequence(Request("warmup", None, [0], SamplingParams(), 0.0), [0], 1)
        for sp in sampling_params:
            dummy_seq.request.params = sp
            for N, B, Q, P in tqdm(buckets, desc="Compiling", disable=not use_tqdm, unit="shape"):
                sampling, mode = build_sampling(ScheduledBatch([dummy_seq], [1], False), B,
                                                self.model_config.vocab_size, self.config.max_logprobs)
                self.runner.execute(self.input_builder.dummy(N, B, Q, P), sampling, mode)
        return time.perf_counter() - start

    # ---- introspection --------------------------------------------------------------------

    def kv_cache_stats(self) -> dict[str, float]:
        bm = self.block_manager
        stored = sum(s.num_computed_tokens for s in self.scheduler.running)
        if bm.num_logical_blocks != bm.num_used_blocks:  # shared blocks: count their tokens once
            filled: dict[int, int] = {}
            for s in self.scheduler.running:
                for i, block in enumerate(s.block_table):
                    n = min(bm.block_size, max(0, s.num_computed_tokens - i * bm.block_size))
                    filled[block] = max(filled.get(block, 0), n)
            stored = sum(filled.values())
        slots = bm.num_used_blocks * bm.block_size
        return {"total_blocks": bm.num_blocks, "used_blocks": bm.num_used_blocks,
                "free_blocks": bm.num_free_blocks, "block_size": bm.block_size,
                "utilization": stored / slots if slots else 0.0,
                "num_preemptions": self.scheduler.num_preemptions,
                "pool_bytes": self.runner.pool_bytes,
                # sharing: blocks held per sequence, summed (what no sharing would need)
                "logical_blocks": bm.num_logical_blocks,
                "cached_blocks": bm.num_cached_blocks,
                "prefix_cache_hit_rate": bm.prefix_cache_hit_rate,
                "swapped_blocks": bm.num_host_used_blocks, "host_blocks": bm.num_host_blocks}

    def beam_search(self, prompts, params) -> list:
        """Beam search (vLLM's shape): one `BeamSearchOutput` per prompt whose `sequences`
        are the beams, best first. See `jpaged.beam_search`."""
        from .beam_search import beam_search
        return beam_search(self, prompts, params)

    def num_compilations(self) -> int:
        return num_step_compilations()
