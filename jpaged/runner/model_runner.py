"""Owns the device side: weights, the one KV pool, its swap space, and the jitted step.

`execute` turns the scheduler's output into the step's fixed-shape arrays (the input
builder and the sampling tensors), runs the step (model forward: logits) and then the
sampler on them, and hands back only the sampled token ids and logprobs (and, for the
prompt positions asked for, prompt logprobs: a small executable per prefill token bucket
runs the model's head on those rows of the step's last hidden states). All are
compiled executables from an `ExecutableTable`; the sampler is its own executable so that
its variants (penalties, logprobs) do not multiply the step's buckets. The pool is donated,
so XLA updates it in place (docs/design.md, "The in-place pool rule");
`step_memory_analysis` lets a test prove the step never copies it.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jpaged.attention.backend import AttentionBackend
from jpaged.attention.metadata import AttentionMetadata
from jpaged.core.scheduler_output import SchedulerOutput
from jpaged.models import ModelConfig
from jpaged.models.llama import HEAD_PARAMS
from jpaged.utils import cache_root

from . import block_ops
from .distributed import Leader, Op
from .executables import ExecutableTable, num_built
from .input_builder import InputBuilder, StepInputs
from .kv_cache import KVCacheConfig
from .sampler import sample, token_logprobs
from .sampling_tensors import (PromptLogprobs, SamplerMode, SamplerOutput, SamplingTensors,
                               batch_sampler_mode, build_sampling_tensors, dummy_sampling_tensors,
                               sampler_modes, sampler_rows)

_LARGE_STEP_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_LARGE_STEP_TOKENS = 1024
# Prompt positions per call of the prompt-logprobs executable: bounds its [rows, vocab] logits
PROMPT_LOGPROB_ROWS = 256


def num_step_compilations() -> int:
    """Executables (steps and samplers) compiled or loaded so far in this process."""
    return num_built()


def enable_compilation_cache(path: str | None) -> None:
    """XLA's persistent cache: a restart loads compiled steps instead of compiling."""
    if path == "":
        return
    path = path or str(cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def executables_dir(compilation_cache_dir: str | None) -> pathlib.Path | None:
    """Where serialized executables live: beside XLA's cache (None when it is disabled)."""
    if compilation_cache_dir == "":
        return None
    return pathlib.Path(compilation_cache_dir or cache_root() / "xla") / "jpaged-executables"


def make_step(module, return_hidden: bool = False):
    """The engine's model step for a Flax `module` (jit it with the pool donated). With
    `return_hidden`, the steps of prefill buckets (Q > 1) also return the last layer's
    output for every packed token (the runner's prompt logprobs read it); decode buckets'
    steps are the same either way."""
    def jpaged_step(params, kv_pool, inputs: StepInputs) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Model forward over the packed new tokens: logits f32[B, V] of each sequence's
        last new token (or (logits, hidden f32[N, hidden_size])), and the pool (donated:
        updated in place and returned)."""
        meta = AttentionMetadata.from_inputs(inputs)
        hidden = {"return_hidden": True} if return_hidden and inputs.query_grid.shape[1] > 1 else {}
        return module.apply({"params": params}, inputs.token_ids, inputs.positions,
                            kv_pool, meta, inputs.logits_index, **hidden)
    return jpaged_step


def make_prompt_logprobs(module):
    """Raw logprobs at prompt positions (jit it with `num_logprobs` static): the model's head
    (`head_logits`) on `rows` i32[C] of a prefill step's hidden states f32[N, hidden_size]
    (the first `num_rows` real), then `sampler.token_logprobs` of each row's next prompt
    token `targets` i32[C]."""
    def jpaged_prompt_logprobs(head_params, hidden, rows, targets, num_rows, *, num_logprobs: int):
        logits = module.head_logits(head_params, hidden[rows], num_rows)
        return token_logprobs(logits, targets, num_logprobs)
    return jpaged_prompt_logprobs


def pad_rows(logits: jax.Array, rows: int) -> jax.Array:
    """Logits padded with zero rows to the sampler's rows."""
    return jnp.pad(logits, ((0, rows - logits.shape[0]), (0, 0)))


class ModelRunner:
    def __init__(self, module, params, model_config: ModelConfig, backend: AttentionBackend,
                 kv: KVCacheConfig, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_logprobs: int, eos_token_ids=(), executables: ExecutableTable | None = None,
                 leader: Leader | None = None, logprobs_mode: str = "raw_logprobs"):
        self.module = module
        self.leader = leader  # process 0 of several: announces each step to the workers
        self.params = params
        self.config = model_config
        self.backend = backend
        self.max_logprobs = max_logprobs
        self.logprobs_mode = logprobs_mode  # what the sampler's logprobs hold (EngineConfig's)
        self.eos_token_ids = tuple(eos_token_ids)
        # A single stream decodes in a 1-row step on the CPU with packed weights (the matmul
        # kernel reads them once whatever the rows) or float32 ones (XLA's dots take a
        # matrix-vector path): a SmolLM2-135M float32 step took 38 ms instead of 105-120 ms
        # padded to 8 rows. Not with unpacked bfloat16: 242 ms for 1 row against 63-71 ms.
        packed = bool(getattr(module, "packed_weights", False))
        single_row = jax.default_backend() == "cpu" and (
            packed or jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32)
        # On the CPU a prefill step costs in proportion to its tokens from 128 up. Packed
        # dense layers skip a bucket's padding rows (`packed_matmul`'s num_rows), so padding
        # costs only the rest of the step, about a quarter of a token each (the scheduler
        # then cuts nothing back to a bucket); the 3/4 buckets (192, 384, ...) keep that
        # small too. A GPU's step stays near its weight-streaming time up to hundreds of
        # tokens, and its buckets stay powers of two.
        self.padding_is_free = packed
        self.input_builder = InputBuilder(kv.block_size, max_num_seqs, max_num_batched_tokens,
                                          kv.max_model_len, single_row_decode=single_row,
                                          fine_token_buckets=jax.default_backend() == "cpu")
        self.max_rows = max(b[1] for b in self.input_builder.step_buckets())
        shape = backend.pool_shape(model_config.num_layers, kv.num_blocks, kv.block_size,
                                   model_config.num_kv_heads, model_config.head_dim)
        # Under tensor parallelism (a ShardedBackend) the pool is made in its shards, each
        # device its KV heads, and the logits come back whole on every device (the sampler
        # then runs on one: XLA's partitioner fails on its top-k barriers, and it is small).
        mesh = getattr(backend, "mesh", None)
        pool_sharding = NamedSharding(mesh, backend.pool_spec(len(shape))) if mesh else None
        self.replicated = NamedSharding(mesh, P()) if mesh else None
        self._pool_layout = (shape, kv.dtype, pool_sharding)
        self.kv_pool = self.new_pool()
        self.pool_bytes = kv.num_blocks * kv.bytes_per_block
        self.host_pool = block_ops.HostKVPool(self.kv_pool, kv.num_host_blocks, backend.block_axis)
        self.executables = executables if executables is not None else ExecutableTable()
        sharded = {} if mesh is None else {"out_shardings": (self.replicated, (pool_sharding,) * 2)}
        self._step = jax.jit(make_step(module, return_hidden=True), donate_argnums=(1,), **sharded)
        self._sample = jax.jit(sample, static_argnames=("mode",))
        self._prompt_logprobs = jax.jit(make_prompt_logprobs(module),
                                        static_argnames=("num_logprobs",))
        self._pad = jax.jit(pad_rows, static_argnums=(1,))

    def cut_buckets(self) -> list[int]:
        """Token buckets the scheduler may cut a prefill back to (`Scheduler.token_buckets`):
        those where halving the step saves more than the extra small step the cut costs.
        SmolLM2-135M float32 on a 2-core Zen 3: 31 ms for 1 token, 48 for 16, 63 for 32, 103
        for 64, 180 for 128, 342 for 256 (a GPU stays near its weight-streaming time up to
        hundreds of tokens)."""
        floor = 128 if jax.default_backend() == "cpu" else 512
        return [n for n in self.input_builder.token_buckets() if n >= floor]

    # ---- the step -------------------------------------------------------------------------

    def execute(self, batch: SchedulerOutput, prompt_rows=()) -> SamplerOutput:
        """Run one scheduled step; returns the sampler's output as numpy arrays, one row per
        sequence of `batch.seqs` (which the input builder may reorder, decode rows longest
        context first), padding rows after them. `prompt_rows`: (sequence, first position,
        count) of prompt positions this step computes whose raw logprobs of the next prompt
        token to return too (`SamplerOutput.prompt_logprobs`, rows in that order)."""
        inputs = self.input_builder.build(batch)
        mode = batch_sampler_mode(batch, self.max_logprobs, self.logprobs_mode)
        rows = sampler_rows(len(inputs.logits_index), mode, self.max_rows)
        sampling = build_sampling_tensors(batch, rows, self.config.vocab_size, mode, self.eos_token_ids)
        prompt = self._prompt_targets(batch, inputs, prompt_rows) if prompt_rows else None
        return self._run(inputs, sampling, mode, prompt)

    @staticmethod
    def _prompt_targets(batch: SchedulerOutput, inputs: StepInputs, prompt_rows):
        """Packed indices of the `prompt_rows` positions and the prompt tokens they predict."""
        row_of = {id(seq): b for b, seq in enumerate(batch.seqs)}
        index, targets = [], []
        for seq, first, count in prompt_rows:
            assert seq.num_computed_tokens <= first and first + count < seq.num_prompt_tokens
            start = int(inputs.query_start_loc[row_of[id(seq)]]) + first - seq.num_computed_tokens
            index.append(np.arange(start, start + count, dtype=np.int32))
            targets.append(np.asarray(seq.token_ids[first + 1:first + 1 + count], np.int32))
        return np.concatenate(index), np.concatenate(targets)

    def _run(self, inputs: StepInputs, sampling: SamplingTensors, mode: SamplerMode, prompt=None):
        """The step, then the sampler (at `sampling`'s rows) on its logits, and the prompt
        logprobs of `prompt` (packed indices, next tokens) if given."""
        if self.leader is None:
            return self._step_and_sample(inputs, sampling, mode, prompt)
        self.leader.send(Op.STEP, self.input_builder.shape_of(inputs), inputs)
        try:
            return self._step_and_sample(inputs, sampling, mode, prompt)
        except Exception as e:  # noqa: BLE001 - the workers ran this step: they are out of step
            raise self.leader.fail(e) from e

    def _step_and_sample(self, inputs: StepInputs, sampling: SamplingTensors, mode: SamplerMode,
                         prompt=None):
        table = self.executables
        shape = self.input_builder.shape_of(inputs)
        logits, hidden = self._forward(shape, inputs)
        if self.replicated is not None:  # whole on every device: the sampler runs on the first
            logits = logits.addressable_shards[0].data
        B, rows = shape[1], len(sampling.temperature)
        if rows != B:
            logits = table.get(("pad", B, rows), lambda: self._lower_pad(B, rows))(logits)
        out = table.get(("sample", rows, mode), lambda: self._lower_sampler(rows, mode))(logits, sampling)
        if prompt is None:
            return jax.device_get(out)
        if self.replicated is not None:
            hidden = hidden.addressable_shards[0].data
        prompt_logprobs = self._prompt_logprobs_of(hidden, *prompt)
        return jax.device_get(out)._replace(prompt_logprobs=prompt_logprobs)

    def _prompt_logprobs_of(self, hidden: jax.Array, index: np.ndarray,
                            targets: np.ndarray) -> PromptLogprobs:
        """Prompt logprobs of the packed tokens `index` of a step's hidden states (their next
        tokens `targets`), PROMPT_LOGPROB_ROWS rows per call."""
        N = hidden.shape[0]
        C = min(N, PROMPT_LOGPROB_ROWS)
        exe = self.executables.get(("prompt_logprobs", N, self.max_logprobs),
                                   lambda: self._lower_prompt_logprobs(N))
        head = self._head_params()
        parts = []
        for i in range(0, len(index), C):
            n = min(C, len(index) - i)
            rows, tokens = np.zeros(C, np.int32), np.zeros(C, np.int32)
            rows[:n], tokens[:n] = index[i:i + n], targets[i:i + n]
            parts.append((n, exe(head, hidden, rows, tokens, np.int32(n))))
        parts = [[np.asarray(x)[:n] for x in jax.device_get(out)] for n, out in parts]
        return PromptLogprobs(*(np.concatenate(xs) for xs in zip(*parts)))

    def _head_params(self):
        """The params the model's head reads (`head_logits`), on the sampler's device."""
        head = {k: v for k, v in self.params.items() if k in HEAD_PARAMS}
        if self.replicated is not None:  # replicated: the first device's copy
            head = jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data, head)
        return head

    def run_step(self, shape: tuple[int, int, int, int], inputs: StepInputs) -> jax.Array:
        """The model step of bucket `shape` on `inputs` (the pool updated); its logits."""
        return self._forward(shape, inputs)[0]

    def _forward(self, shape: tuple[int, int, int, int], inputs: StepInputs):
        """`run_step`'s logits, and the last layer's output for every packed token (None in a
        decode bucket)."""
        step = self.executables.get(("step", shape), lambda: self._lower_step(shape))
        out, self.kv_pool = step(self.params, self.kv_pool, inputs)
        return out if isinstance(out, tuple) else (out, None)

    # ---- compiling ------------------------------------------------------------------------

    def _lower_step(self, shape: tuple[int, int, int, int]):
        # Steps of 1,024+ tokens run their large matmuls faster in XLA's own CPU dots than in
        # YNNPACK's (a 2,048-token step 1.2x faster); smaller steps are faster with YNNPACK
        # (a 64-row decode step 1.1x, a 32-token prefill 2.5x).
        large = jax.default_backend() == "cpu" and shape[0] >= _LARGE_STEP_TOKENS
        lowered = self._step.lower(self.params, self.kv_pool, self.input_builder.dummy(*shape))
        return lowered, (_LARGE_STEP_CPU_OPTIONS if large else None)

    def _logits_spec(self, rows: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32)

    def _lower_pad(self, num_rows: int, rows: int):
        spec = self._logits_spec(num_rows)
        return self._pad.lower(spec, rows), None

    def _lower_sampler(self, rows: int, mode: SamplerMode):
        spec = self._logits_spec(rows)
        return self._sample.lower(spec, dummy_sampling_tensors(rows, self.config.vocab_size, mode),
                                  mode=mode), None

    def _lower_prompt_logprobs(self, num_tokens: int):
        hidden = jax.ShapeDtypeStruct((num_tokens, self.config.hidden_size), jnp.float32)
        rows = jax.ShapeDtypeStruct((min(num_tokens, PROMPT_LOGPROB_ROWS),), jnp.int32)
        return self._prompt_logprobs.lower(self._head_params(), hidden, rows, rows,
                                           jax.ShapeDtypeStruct((), jnp.int32),
                                           num_logprobs=self.max_logprobs), None

    def executables_needed(self, modes=None, prompt_logprobs: bool = True):
        """(key, lower) of every executable this configuration can call: each step bucket,
        for each sampler mode (default: all) its row counts and the logits padding, and with
        `prompt_logprobs` the prompt-logprobs executable of each prefill token bucket."""
        modes = (sampler_modes(self.max_logprobs, self.logprobs_mode) if modes is None
                 else list(modes))
        buckets = self.input_builder.step_buckets()
        items = []  # samplers first: their long compiles overlap the steps' tracing
        for mode in modes:
            for B in sorted({b[1] for b in buckets}):
                rows = sampler_rows(B, mode, self.max_rows)
                items.append((("sample", rows, mode), lambda r=rows, m=mode: self._lower_sampler(r, m)))
                if rows != B:
                    items.append((("pad", B, rows), lambda B=B, r=rows: self._lower_pad(B, r)))
        if prompt_logprobs:
            items += [(("prompt_logprobs", N, self.max_logprobs),
                       lambda N=N: self._lower_prompt_logprobs(N))
                      for N in self.input_builder.token_buckets()]
        items += [(("step", s), lambda s=s: self._lower_step(s)) for s in buckets]
        return list(dict(items).items())  # once each

    def warmup(self, items=None, workers: int = 2, progress=None) -> int:
        """Compile (or load) `items` (default: every executable `executables_needed` lists),
        running none, and the block-copy (and, with swap space, swap) variants; returns how
        many executables there are."""
        items = items if items is not None else self.executables_needed()
        self.executables.build(items, workers, progress)
        # Copy-on-write block copies (samples and beams sharing a last block), every length.
        self.kv_pool = block_ops.warm_copies(self.kv_pool, self.input_builder.max_num_seqs,
                                             self.backend.block_axis)
        if self.host_pool.num_blocks:  # swap preemption: every chunk length a swap uses
            self.kv_pool = block_ops.warm_swaps(self.kv_pool, self.host_pool.num_blocks,
                                                self.backend.block_axis)
        return len(items)

    def lower(self, shape: tuple[int, int, int, int]):
        """The step of one bucket (N, B, Q, P), lowered."""
        return self._lower_step(shape)[0]

    def step_memory_analysis(self, shape: tuple[int, int, int, int]):
        return self.lower(shape).compile().memory_analysis()

    def dummy_sampling(self, num_rows: int, mode: SamplerMode) -> SamplingTensors:
        """Greedy sampling tensors for a step of `num_rows` rows, at the sampler's rows."""
        return dummy_sampling_tensors(sampler_rows(num_rows, mode, self.max_rows),
                                      self.config.vocab_size, mode)

    # ---- whole-block operations (copy-on-write, swapping): jitted, the pool donated ----------

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Block dst := block src for each (src, dst), in the K and V pools (all reads first)."""
        src, dst = zip(*pairs)
        if self.leader is not None:
            padded = np.stack([block_ops.padded(src, 0), block_ops.padded(dst, 0)])
            self.leader.send(Op.COPY, (padded.shape[1], len(pairs)), padded)
        self.kv_pool = block_ops.copy_blocks(self.kv_pool, src, dst, self.backend.block_axis)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (device block, host block) into the host pool."""
        dev, host = zip(*pairs)
        self.host_pool.store(host, block_ops.gather_blocks(self.kv_pool, dev, self.backend.block_axis))

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (host block, device block) back into the pool."""
        host, dev = zip(*pairs)
        self.kv_pool = block_ops.scatter_blocks(self.kv_pool, dev, self.host_pool.load(host),
                                                self.backend.block_axis)

    def blocks(self, blocks) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of the K and V of `blocks` (for tests and inspection)."""
        return block_ops.gather_blocks(self.kv_pool, blocks, self.backend.block_axis)

    # ---- memory between rollouts (`EngineCore.sleep` / `update_weights`) ----------------------

    def new_pool(self) -> tuple[jax.Array, jax.Array]:
        """A zeroed K and V pool of this runner's shape, dtype and sharding."""
        shape, dtype, sharding = self._pool_layout
        return tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(2))

    def release_pool(self) -> None:
        """Delete the pool's buffers now (not when the garbage collector gets to them)."""
        for x in self.kv_pool or ():
            x.delete()
        self.kv_pool = None

    def release_params(self) -> None:
        for x in jax.tree_util.tree_leaves(self.params):
            x.delete()
        self.params = None
