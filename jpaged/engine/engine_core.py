"""The engine core: requests in, one step at a time, RequestOutputs out.

Each `step()` runs the data flow once: scheduler (which sequences, how many tokens, which
block operations) -> block operations on the pool (swaps, copy-on-write copies) -> model
runner (input builder, jitted forward + sampling) -> output processing (append tokens,
detokenize, stop checks) -> finished sequences' blocks freed. It owns the runner, so it
sits above the host side (`jpaged.core`) and may import jax; `LLM` is a thin layer on it
and the server's `AsyncEngine` drives it from a thread (docs/design.md, "One step").
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import itertools
import threading
import time
from typing import Any, Callable, Sequence as Seq

import jax
import numpy as np

from jpaged.config import EngineConfig
from jpaged.core.block_manager import BlockManager
from jpaged.core.kv_alloc_policy import make_policy
from jpaged.core.scheduler import Scheduler
from jpaged.core.scheduler_output import SchedulerOutput
from jpaged.core.sequence import Request, Sequence
from jpaged.exceptions import (DistributedError, EngineStateError, InvalidRequestError,
                               InvalidRequestTypeError)
from jpaged.outputs import RequestOutput
from jpaged.runner import distributed
from jpaged.runner.kv_cache import plan_kv_cache
from jpaged.runner.model_loader import is_default_model, load_model
from jpaged.runner.executables import ExecutableTable, source_fingerprint
from jpaged.runner.model_runner import (ModelRunner, enable_compilation_cache, executables_dir,
                                        num_step_compilations)
from jpaged.runner.sampling_tensors import sampler_mode
from jpaged.runner.weights import WeightLayout
from jpaged.sampling_params import BeamSearchParams, SamplingParams

from .beam_search import BeamGroup, beam_sampling_params
from .detokenizer import DetokState
from .engine_client import PAUSE_MODES
from .input_processor import InputProcessor, ProcessedPrompt, PromptType
from .output_processor import OutputProcessor, finish, prompt_logprob_rows
from .stats import EngineStats

# Sampling defaults when the model's files set none (the embedded GGUF has no generation
# config): greedy, because a small instruct model's first tokens are too uncertain to
# sample from (asked "What is the capital of France?", SmolLM2-135M starts with "The" at
# 15% and "L" at 14%; sampled, even at temperature 0.2, a third of the answers drift into
# French-like text; greedy answers "The capital of France is Paris."). `SamplingParams()`
# itself keeps vLLM's defaults (temperature 1.0).
DEFAULT_GENERATION_CONFIG = {"temperature": 0.0}



def _device_bytes(tree) -> int:
    """Bytes of `tree`'s arrays on the first device that holds them."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(tree))


def eos_token_ids(loaded) -> set[int]:
    """The model's end-of-sequence ids: its config's and its tokenizer's."""
    eos = set(loaded.config.eos_token_ids)
    if getattr(loaded.tokenizer, "eos_token_id", None) is not None:
        eos.add(loaded.tokenizer.eos_token_id)
    return eos


def build_runner(config: EngineConfig, model, params=None, tokenizer=None,
                 leader: distributed.Leader | None = None):
    """The model loaded, its KV pool planned, and the runner over them: (loaded, kv, runner);
    the engine's and every worker process's the same way."""
    loaded = load_model(model, params=params, tokenizer=tokenizer, dtype=config.dtype,
                        scan_layers=config.scan_layers, attention_backend=config.attention_backend,
                        pack_weights=config.pack_weights,
                        tensor_parallel_size=config.tensor_parallel_size)
    kv = plan_kv_cache(config, loaded.config, jax.tree_util.tree_leaves(loaded.params)[0].dtype,
                       loaded.backend)
    runner = ModelRunner(loaded.module, loaded.params, loaded.config, loaded.backend, kv,
                         max_num_seqs=config.max_num_seqs,
                         max_num_batched_tokens=config.max_num_batched_tokens,
                         max_logprobs=config.max_logprobs, eos_token_ids=sorted(eos_token_ids(loaded)),
                         executables=executable_table(config, loaded, kv), leader=leader,
                         logprobs_mode=config.logprobs_mode)
    return loaded, kv, runner


def executable_table(config: EngineConfig, loaded, kv) -> ExecutableTable:
    """The runner's executables, saved beside XLA's cache for a model loaded from a path
    (an in-memory model's code is not in the fingerprint: it keeps to XLA's cache)."""
    directory = executables_dir(config.compilation_cache_dir)
    # A sharded executable loaded back from disk refuses host inputs ("expected 2
    # shards"): under tensor parallelism XLA's persistent cache serves them instead.
    if directory is None or loaded.path is None or config.tensor_parallel_size > 1:
        enable_compilation_cache(config.compilation_cache_dir)
        return ExecutableTable()
    leaves = jax.tree_util.tree_flatten(loaded.params)
    identity = repr((source_fingerprint(), type(loaded.module).__qualname__, loaded.config,
                     str(leaves[1]), [(x.shape, str(x.dtype)) for x in leaves[0]],
                     loaded.backend.name, str(kv.dtype), kv.num_blocks, kv.block_size,
                     kv.max_model_len, getattr(loaded.module, "packed_weights", False),
                     config.tensor_parallel_size))
    return ExecutableTable(directory, hashlib.sha256(identity.encode()).hexdigest())


def process_identity(config: EngineConfig, loaded, kv) -> str:
    """What every process of one JAX program must share: engine arguments (but the rank),
    the model's layout and the pool's plan."""
    args = dataclasses.replace(config, process_id=0)
    shapes = [(x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(loaded.params)]
    return repr((args, loaded.config, shapes, kv))


class EngineCore:
    """`model`: None (the embedded SmolLM2-135M-Instruct), a path to a Hugging Face folder or
    a .gguf file, or an in-memory Flax model (then pass `params=` and `tokenizer=`). Other
    keyword arguments: `EngineConfig` fields."""

    def __init__(self, model=None, *, params=None, tokenizer=None, **engine_args):
        self.config = config = EngineConfig(**engine_args)
        start = time.perf_counter()
        self.leader = None
        if config.num_processes > 1:  # process 0 of several: the others follow its steps
            if config.process_id != 0:
                raise ValueError(f"process_id={config.process_id} is a worker: run `jpaged worker` "
                                 "(jpaged.run_worker) there; the engine is process 0")
            distributed.initialize(config.coordinator_address, config.num_processes, 0)
            self.leader = distributed.Leader()
        loaded, kv, self.runner = build_runner(config, model, params, tokenizer, self.leader)
        if self.leader is not None:
            distributed.agree(process_identity(config, loaded, kv))
            atexit.register(self.leader.stop)
        self.model_path = loaded.path  # the file or folder loaded (None: an in-memory model)
        self.is_default_model = model is None or is_default_model(loaded.path)
        self.model_config = loaded.config
        self.weights = WeightLayout(loaded.module, loaded.weights_config or loaded.config,
                                    loaded.params)
        self.tokenizer = loaded.tokenizer
        self.generation_config = loaded.generation_config or dict(DEFAULT_GENERATION_CONFIG)
        self.eos_token_ids = eos = set(self.runner.eos_token_ids)
        self.max_model_len = kv.max_model_len
        self.block_manager = BlockManager(
            kv.num_blocks, config.block_size, config.enable_prefix_caching, kv.num_host_blocks,
            policy=make_policy(config.kv_policy, config.block_size, kv.max_model_len),
            share_blocks=config.enable_block_sharing)
        self.scheduler = Scheduler(config, self.block_manager, self.runner.cut_buckets(),
                                   padding_is_free=self.runner.padding_is_free)
        self.input_processor = InputProcessor(self.tokenizer, loaded.config.vocab_size, kv.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer, eos, kv.max_model_len)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.stats = EngineStats()
        self._request_counter = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        # Pausing and sleeping (`pause`, `sleep`): requests added meanwhile wait here, out
        # of the scheduler, until both are over.
        self.paused = False
        self._pausing = False  # pause("wait"): the requests in flight finish, then paused
        self.sleep_level = 0
        self._held: list[Request] = []
        self._host_params = None  # sleep(level=1): the weights in host memory
        self.weights_version = 0  # update_weights calls so far
        self.load_s = time.perf_counter() - start

    @property
    def params(self):
        """The runner's params, in the layout it runs (`get_weights` gives the canonical one)."""
        return self.runner.params

    # ---- requests -------------------------------------------------------------------------

    def default_sampling_params(self) -> SamplingParams:
        """What a request without sampling parameters runs with: the model's generation
        config (its generation_config.json) when it sets any, else
        `DEFAULT_GENERATION_CONFIG`; every other field keeps SamplingParams' default."""
        return SamplingParams(**self.generation_config)

    def add_request(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None,
                    request_id: str | None = None, *,
                    beam_params: BeamSearchParams | None = None,
                    client_request_id: str | None = None) -> str:
        """Check and queue one request; raises `InvalidRequestError` (a ValueError / TypeError)
        before touching any state. `beam_params` makes it a beam-search request;
        `client_request_id` names the client request it is part of (the server's requests
        with several prompts): the scheduler admits client requests in turns."""
        if beam_params is not None:
            params = beam_sampling_params(beam_params, self.eos_token_ids, self.config.max_num_seqs,
                                          self.config.max_logprobs)
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestTypeError(
                f"sampling params must be SamplingParams, got {type(params).__name__}")
        for field in ("logprobs", "prompt_logprobs"):
            if (getattr(params, field) or 0) > self.config.max_logprobs:
                raise InvalidRequestError(f"{field}={getattr(params, field)} exceeds max_logprobs="
                                          f"{self.config.max_logprobs}", field)
        prompt = self.input_processor.process(prompt)
        if self.runner.params is None and not self.sleep_level:
            raise EngineStateError(self._no_weights_message())
        request_id = request_id if request_id is not None else str(next(self._request_counter))
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already running")
        if params.best_of > self.config.max_num_seqs:  # its samples run together
            raise InvalidRequestError(f"best_of (or n) = {params.best_of} exceeds max_num_seqs="
                                      f"{self.config.max_num_seqs}", "n")
        ids = prompt.token_ids
        request = Request(request_id, prompt.text, ids, params, time.monotonic(),
                          client_request_id=client_request_id)
        if params.prompt_logprobs is not None:  # the first token has none (vLLM's shape)
            request.prompt_logprobs = [None]
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
        if beam_params is not None:
            request.beam = BeamGroup(request, beam_params, self.eos_token_ids, self.max_model_len)
        if self.paused or self._pausing or self.sleep_level:
            self._held.append(request)  # runs after resume() / wake_up()
        else:
            self.scheduler.add(request.seqs[0])
        self.requests[request_id] = request
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its blocks (unknown or finished ids are ignored)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request in self._held:
            self._held.remove(request)
        for seq in request.seqs:
            if not seq.finished:
                finish(seq, "abort")
                self.scheduler.remove(seq)
        self._check_paused()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- pausing, weights, sleep (research pipelines; docs/design.md, "Weights in place") ---

    def _in_flight(self) -> int:
        """Unfinished requests the scheduler has (held ones excepted)."""
        return len(self.requests) - len(self._held)

    def can_step(self) -> bool:
        """Whether a step would run anything: requests in flight, not paused, not asleep."""
        return self._in_flight() > 0 and not self.paused and not self.sleep_level

    def _check_paused(self) -> None:
        if self._pausing and not self._in_flight():
            self._pausing, self.paused = False, True

    def _release_held(self) -> None:
        if self.paused or self._pausing or self.sleep_level or self.runner.params is None:
            return
        held, self._held = self._held, []
        for request in held:
            self.scheduler.add(request.seqs[0])

    def pause_requests(self, mode: str = "wait") -> list[Request]:
        """Stop generating, as vLLM's `pause_generation` (`LLM.pause`, `EngineClient.pause`
        call it). Requests added from now on wait until `resume()`. The requests in flight:
        `wait` lets them finish (the engine is paused when the last one has: `is_paused()`;
        the caller's loop keeps stepping), `abort` aborts them (returned, finished with
        "abort", for the caller to deliver), `keep` freezes them where they are, blocks and
        all, to go on after `resume()` (with the weights then in place)."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {PAUSE_MODES}, got {mode!r}")
        aborted = []
        if mode == "abort":
            for request_id, request in list(self.requests.items()):
                if request not in self._held:
                    self.abort_request(request_id)
                    aborted.append(request)
        if mode == "wait" and self._in_flight() and not self.paused:
            self._pausing = True
        else:
            self._pausing, self.paused = False, True
        return aborted

    def resume(self) -> None:
        """Undo `pause`: frozen requests go on, and those that came meanwhile start."""
        self.paused = self._pausing = False
        self._release_held()

    def is_paused(self) -> bool:
        return self.paused

    def _check_can_change(self, what: str) -> None:
        if self.leader is not None:
            raise EngineStateError(f"{what} is not available with num_processes > 1")
        if self._in_flight() and not self.paused:
            raise EngineStateError(
                f"{what} needs a paused engine: {self._in_flight()} requests are in flight; "
                "call pause(mode='wait' | 'abort' | 'keep') first")

    def get_weights(self):
        """The weights as the canonical param tree: per-layer `layers_i`, unpacked and whole
        (models/loader.py's layout, what `LLM(model=..., params=...)`, `update_weights` and
        `jpaged.models.causal_forward` take). A copy: new arrays the caller owns."""
        if self.runner.params is None:
            raise EngineStateError(self._no_weights_message())
        return self.weights.to_canonical(self.runner.params)

    def update_weights(self, params) -> None:
        """Replace the weights in place with `params` (a tree of `get_weights`'s paths,
        shapes and dtypes: numpy or jax arrays, on any device). They are copied into the
        engine's own arrays in the runner's layout (packed, stacked, sharded), so nothing
        recompiles and the caller may go on updating or donating its arrays; the old ones
        are deleted. Prefix-cache blocks computed with the old weights are never matched
        again. Needs an idle or paused engine (requests kept by pause("keep") go on with the
        new weights). A tree that does not match raises ValueError naming the first
        mismatching leaf, and the old weights stay."""
        self._check_can_change("update_weights")
        if self.sleep_level:
            raise EngineStateError("the engine is asleep: call wake_up() before update_weights")
        new = self.weights.to_engine(self.weights.normalize(params))
        old, self.runner.params = self.runner.params, new
        if old is not None:
            for x in jax.tree_util.tree_leaves(old):
                x.delete()
        self._invalidate_prefix_cache()
        self.weights_version += 1
        self._release_held()  # after sleep(level=2), requests wait for weights

    def _invalidate_prefix_cache(self) -> None:
        sched = self.scheduler
        unplaced = [s for s in sched.waiting if not s.block_table]
        unplaced += [s for r in self._held for s in r.seqs]
        self.block_manager.invalidate_prefix_cache(unplaced)

    def sleep(self, level: int = 1) -> None:
        """Free the accelerator's memory between rollouts, as vLLM's sleep mode: level 1
        deletes the KV pool and moves the weights to host memory, level 2 deletes both (then
        `update_weights` must bring weights after `wake_up`). The prefix cache is emptied.
        Needs no request in flight (pause(mode="abort") first, or let them finish); requests
        added while asleep wait for `wake_up`."""
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        if self.sleep_level:
            raise EngineStateError(f"the engine is asleep already (level {self.sleep_level})")
        if self.leader is not None:
            raise EngineStateError("sleep is not available with num_processes > 1")
        if self._in_flight():
            raise EngineStateError(
                f"{self._in_flight()} requests are in flight: let them finish or "
                "pause(mode='abort') before sleep()")
        self._invalidate_prefix_cache()
        self.runner.release_pool()
        if level == 1 and self.runner.params is not None:
            self._host_params = jax.device_get(self.runner.params)
        self.runner.release_params()
        self.sleep_level = level

    def wake_up(self) -> None:
        """Undo `sleep`: a fresh (empty) KV pool, and the weights back from host memory
        (level 1) or none until `update_weights` (level 2). Requests that came meanwhile start."""
        if not self.sleep_level:
            return
        self.runner.kv_pool = self.runner.new_pool()
        if self._host_params is not None:
            self.runner.params = jax.device_put(self._host_params, self.weights.shardings)
            self._host_params = None
        self.sleep_level = 0
        self._release_held()

    def is_sleeping(self) -> bool:
        return bool(self.sleep_level)

    def _no_weights_message(self) -> str:
        if self.sleep_level:
            return "the engine is asleep: call wake_up() first"
        return ("the weights were discarded by sleep(level=2): call update_weights(params) "
                "before generating")

    # ---- sequences (for beam search) ------------------------------------------------------

    def fork_sequence(self, parent: Sequence, child: Sequence) -> None:
        """A running sequence gains a sibling that shares all its blocks."""
        self.scheduler.fork(parent, child)

    def free_sequence(self, seq: Sequence) -> None:
        """End a sequence of a running request and free what only it held."""
        if not seq.finished:
            finish(seq, "stop")
        self.scheduler.remove(seq)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; return outputs of the requests it advanced."""
        return [self.output_processor.request_output(r) for r in self.step_requests()]

    def step_requests(self) -> list[Request]:
        """Run one scheduled step; return the requests it advanced (beam searches excepted:
        `LLM.beam_search` reads their groups)."""
        if not self.can_step():
            return []
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        self._apply_block_ops(batch)
        if not batch.seqs:  # only swaps this step
            return []
        prompt_rows = prompt_logprob_rows(batch)
        out = self.runner.execute(batch, prompt_rows)
        if prompt_rows:
            self.output_processor.append_prompt_logprobs(prompt_rows, out.prompt_logprobs)
        touched: dict[str, Request] = {}
        beams = {}
        for b, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += n
            if batch.is_prefill and b >= batch.num_decode:
                self.stats.prefill_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk that samples nothing yet
            if seq.request.beam is not None:  # beam search picks its tokens per request
                seq.request.beam.receive(seq, out, b)
                beams[seq.request.request_id] = seq.request
                continue
            self.output_processor.append_token(seq, out, b)
            self.stats.output_tokens += 1
            touched[seq.request.request_id] = seq.request
        for request_id, request in beams.items():
            self.stats.output_tokens += request.beam.advance(self)
            if request.beam.done:
                del self.requests[request_id]
        num_decode = batch.num_decode if batch.is_prefill else len(batch.seqs)
        self.stats.record_step(self.kv_cache_stats()["utilization"], num_decode)
        if self.stats.record_memory:
            sched = self.scheduler
            self.stats.record_memory_breakdown(self.block_manager.memory_breakdown(
                sched.running, self.max_model_len, sched.next_to_admit()))
        for request in touched.values():
            for seq in request.seqs:
                if seq.finished and seq.block_table:
                    self.scheduler.remove(seq)
            if request.finished:
                del self.requests[request.request_id]
        self._check_paused()
        return list(touched.values())

    def run_loop(self, drain: Callable[[float | None], bool], deliver: Callable[[list[Request]], None],
                 step_failed: Callable[[Exception], None]) -> None:
        """The serving loop of both server engines (a thread, a process): `drain(wait_s)` runs
        the commands that came, waiting up to `wait_s` for the first (None: while idle, until
        one comes), and returns False to stop; each step's advanced requests go to `deliver`;
        a step that raises goes to `step_failed`, and serving goes on."""
        while drain(0.0 if self.can_step() else None):
            if not self.can_step():
                continue
            steps = self.stats.steps
            try:
                requests = self.step_requests()
            except DistributedError:  # a process of the JAX program is gone: no step can run
                raise
            except Exception as e:  # noqa: BLE001 - keep serving the next requests
                step_failed(e)
                continue
            deliver(requests)
            if not requests and self.stats.steps == steps and not drain(0.01):
                return  # nothing could be scheduled: wait a little for a command, not spin

    def _apply_block_ops(self, batch: SchedulerOutput) -> None:
        """Swaps and copy-on-write copies the scheduler asked for, before the step runs."""
        if batch.blocks_to_swap_in:
            self.runner.swap_in(batch.blocks_to_swap_in)
        if batch.blocks_to_swap_out:
            self.runner.swap_out(batch.blocks_to_swap_out)
        if batch.blocks_to_copy:
            self.runner.copy_blocks(batch.blocks_to_copy)
        self.stats.blocks_copied += len(batch.blocks_to_copy)
        self.stats.blocks_swapped += len(batch.blocks_to_swap_in) + len(batch.blocks_to_swap_out)

    def warmup(self, sampling_params: Seq[SamplingParams] | None = None, *, use_tqdm: bool = True,
               workers: int = 2) -> float:
        """Compile (or load from disk) every executable a request can need: each step bucket
        this configuration can produce, the sampler for every mode (penalties, logprobs;
        greedy, sampled and filtered rows share one) and the prompt-logprobs executable of
        each prefill bucket, or only what `sampling_params` need. Runs nothing. Returns the
        seconds it took."""
        from tqdm.auto import tqdm
        if self.runner.params is None or self.runner.kv_pool is None:
            raise EngineStateError(self._no_weights_message())
        start = time.perf_counter()
        modes = None if sampling_params is None else list(dict.fromkeys(
            sampler_mode([sp], sp.min_tokens > 0, self.config.max_logprobs, self.config.logprobs_mode)
            for sp in sampling_params))
        prompt_logprobs = sampling_params is None or any(sp.prompt_logprobs is not None
                                                         for sp in sampling_params)
        items = self.runner.executables_needed(modes, prompt_logprobs)
        with tqdm(total=len(items), desc="Compiling", disable=not use_tqdm, unit="exe") as bar:
            lock = threading.Lock()

            def progress():
                with lock:
                    bar.update()
            self.runner.warmup(items, workers, progress)
        return time.perf_counter() - start

    # ---- introspection --------------------------------------------------------------------

    def kv_cache_stats(self) -> dict[str, Any]:
        """The pool now: blocks in use and free, utilization (tokens stored / slots in the
        blocks in use, shared blocks counted once), sharing, prefix cache and swap space."""
        bm = self.block_manager
        running = self.scheduler.running
        stored = sum(s.num_computed_tokens for s in running)
        if bm.num_logical_blocks != bm.num_used_blocks:  # shared blocks: count their tokens once
            filled: dict[int, int] = {}
            for s in running:
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
                # what the first device holds (all of it on one device; its shards under
                # tensor parallelism)
                "pool_bytes_per_device": _device_bytes(self.runner.kv_pool),
                "weight_bytes_per_device": _device_bytes(self.runner.params),
                # sharing: blocks held per sequence, summed (what no sharing would need)
                "logical_blocks": bm.num_logical_blocks,
                "cached_blocks": bm.num_cached_blocks,
                "prefix_cache_hit_rate": bm.prefix_cache.hit_rate,
                "swapped_blocks": bm.swap_space.num_used_blocks,
                "host_blocks": bm.swap_space.num_blocks}

    def num_requests(self) -> dict[str, int]:
        """Requests running, waiting and swapped out (a request's samples or beams count once)."""
        sched = self.scheduler

        def requests(seqs):
            return len({id(s.request) for s in seqs})
        return {"running": requests(sched.running), "waiting": requests(sched.waiting),
                "swapped": requests(s for group in sched.swapped for s in group)}

    def snapshot(self) -> dict[str, Any]:
        """The engine's state for the server's /metrics and health: KV stats, request counts,
        counters (a copy), executables built, and when (time.monotonic())."""
        counts = self.num_requests()
        return {"kv": self.kv_cache_stats(), "num_running": counts["running"],
                "num_waiting": counts["waiting"], "num_swapped": counts["swapped"],
                "num_requests": len(self.requests), "stats": dataclasses.replace(self.stats),
                "compilations": self.num_compilations(), "time": time.monotonic()}

    def num_compilations(self) -> int:
        """Executables (steps, samplers) compiled or loaded from disk in this process."""
        return num_step_compilations()
