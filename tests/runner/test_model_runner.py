"""The step updates the KV pool in place and compiles only for known buckets."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams

from helpers import build_tiny_hf
from helpers import NoTokenizer


def _tiny_llm(tmp_path, **kw):
    build_tiny_hf("llama", tmp_path, vocab_size=512)
    args = dict(tokenizer=NoTokenizer(), max_num_seqs=4, max_model_len=128, max_num_batched_tokens=64,
                kv_cache_memory=32 << 20, compilation_cache_dir="")
    args.update(kw)
    return LLM(str(tmp_path), **args)


@pytest.mark.parametrize("backend,dtype", [("cpu", "float32"), ("cpu", "bfloat16"), ("xla", "float32")])
def test_step_never_copies_the_pool(tmp_path, backend, dtype):
    """Float32 and bfloat16 pools (the `cpu` backend's own write keeps a bfloat16 model's
    pool bfloat16 and in place)."""
    llm = _tiny_llm(tmp_path, kv_cache_memory=256 << 20, attention_backend=backend, dtype=dtype)
    assert llm.runner.backend.name == backend
    assert jax.tree_util.tree_leaves(llm.runner.kv_pool)[0].dtype == dtype
    pool = llm.runner.pool_bytes
    assert pool > 200 << 20
    for shape in [(8, 8, 1, 8), (64, 4, 32, 8)]:  # a decode bucket and a prefill bucket
        mem = llm.runner.step_memory_analysis(shape)
        # A copying step needs a pool-sized temporary; an in-place one a few MiB.
        assert mem.temp_size_in_bytes < pool // 20, (shape, mem.temp_size_in_bytes, pool)
        assert mem.alias_size_in_bytes >= pool  # and the donated pool is the output


def test_no_compilation_after_warmup(tmp_path):
    llm = _tiny_llm(tmp_path)
    llm.warmup(use_tqdm=False)
    before = llm.num_compilations()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, int(n)).tolist() for n in rng.integers(1, 100, 12)]
    # Every sampler path a request can take: greedy, sampled, filtered, penalized, logprobs,
    # min_tokens (a ban mask), several samples; mixed in one batch and alone.
    kinds = [dict(temperature=0.0), dict(temperature=0.8, seed=1), dict(temperature=1.0, top_p=0.5),
             dict(temperature=0.7, top_k=3, min_p=0.1), dict(temperature=0.0, repetition_penalty=1.2),
             dict(temperature=0.9, presence_penalty=0.5, logprobs=2), dict(temperature=0.0, logprobs=0),
             dict(temperature=0.0, min_tokens=2), dict(temperature=1.0, n=2),
             dict(temperature=0.0, frequency_penalty=0.3, logprobs=5), dict(temperature=0.6),
             dict(temperature=0.0)]
    params = [SamplingParams(max_tokens=int(m), ignore_eos=True, **kinds[i % len(kinds)])
              for i, m in enumerate(rng.integers(1, 28, 12))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    for prompt, p in zip(prompts[:4], params[4:8]):  # alone: single-row steps
        llm.generate([prompt], p, use_tqdm=False)
    # prompt logprobs (their own executable per prefill bucket), a prompt in two chunks
    out = llm.generate([rng.integers(3, 500, 100).tolist(), prompts[0]],
                       SamplingParams(max_tokens=2, prompt_logprobs=3), use_tqdm=False)
    assert [len(o.prompt_logprobs) for o in out] == [100, len(prompts[0])]
    assert llm.num_compilations() == before


@pytest.mark.parametrize("single_row", [False, True])
def test_decode_buckets_are_multiples_of_eight_or_one_row(single_row):
    from jpaged.runner.input_builder import InputBuilder, decode_bucket
    one = [1] if single_row else [8]
    assert [decode_bucket(n, single_row) for n in (1, 2, 8, 9, 20, 57, 64, 65, 200, 257)] == \
        one + [8, 8, 16, 24, 64, 64, 96, 224, 512]
    ib = InputBuilder(block_size=16, max_num_seqs=64, max_num_batched_tokens=256, max_model_len=256,
                      single_row_decode=single_row)
    decode = sorted(B for N, B, Q, P in ib.step_buckets() if Q == 1)
    assert decode == one[:single_row] + list(range(8, 65, 8))  # every decode shape warm-up must compile


def test_fine_token_buckets_pad_a_prefill_by_at_most_a_third():
    """On the CPU prefill steps also get 3/4 of each power of two from 192 up; every bucket
    holds whole query tiles, and every batch's tokens land in a bucket warm-up compiles."""
    from jpaged.runner.input_builder import PREFILL_TILE, InputBuilder, token_bucket
    assert [token_bucket(n, True) for n in (1, 100, 129, 162, 192, 193, 314, 385, 600, 1100, 2048)] == \
        [16, 128, 192, 192, 192, 256, 384, 512, 768, 1536, 2048]
    assert [token_bucket(n) for n in (162, 314, 600)] == [256, 512, 1024]  # powers of two only
    coarse, fine = (InputBuilder(16, 64, 2048, 2048, fine_token_buckets=f) for f in (False, True))
    assert fine.token_buckets() == [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert set(coarse.token_buckets()) < set(fine.token_buckets())
    assert all(n % PREFILL_TILE == 0 for n in fine.token_buckets() if n >= PREFILL_TILE)
    for n in range(129, 2049):
        b = token_bucket(n, True)
        assert n <= b and (b - n) * 3 < b + 48 and b in fine.token_buckets()


def test_a_cpu_runner_uses_the_fine_token_buckets(tmp_path):
    llm = _tiny_llm(tmp_path, max_num_batched_tokens=256, max_model_len=256)
    assert llm.runner.input_builder.fine_token_buckets is True
    assert 192 in llm.runner.cut_buckets()


@pytest.mark.parametrize("dtype,pack,single_row", [("float32", False, True), ("bfloat16", False, False),
                                                  ("float32", True, True), ("bfloat16", True, True)])
def test_single_stream_row_follows_the_weights(tmp_path, dtype, pack, single_row):
    """One running sequence decodes in a 1-row step with packed weights (the matmul kernel) or
    float32 ones (XLA's CPU matrix-vector dots), padded to 8 rows with unpacked bfloat16
    ones (slower as one row)."""
    llm = _tiny_llm(tmp_path, dtype=dtype, pack_weights=pack)
    assert llm.runner.input_builder.single_row_decode is single_row
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def _kernel_ndims(params) -> set[int]:
    return {leaf.ndim for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if path[-1].key == "kernel"}


@pytest.mark.parametrize("kind,dtype,scan_layers", [
    ("llama", "float32", False), ("qwen2", "bfloat16", True),  # both dtypes, both layouts, a bias
    pytest.param("qwen2", "float32", False, marks=pytest.mark.slow),
    pytest.param("llama", "bfloat16", False, marks=pytest.mark.slow)])
def test_packed_weights_generate_what_unpacked_ones_do(tmp_path, kind, dtype, scan_layers):
    """The CPU runner packs every dense kernel (and a tied embedding) for the matmul kernel;
    greedy tokens and their logprobs are those of the unpacked model (untied and tied
    heads, q/k/v bias (qwen2), stacked layers, both weight dtypes)."""
    build_tiny_hf(kind, tmp_path, vocab_size=512)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 500, int(n)).tolist() for n in (1, 7, 40, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    runs = {}
    for pack in (False, True):
        llm = LLM(str(tmp_path), tokenizer=NoTokenizer(), max_num_seqs=4, max_model_len=128,
                  max_num_batched_tokens=64, kv_cache_memory=16 << 20, compilation_cache_dir="",
                  dtype=dtype, scan_layers=scan_layers, pack_weights=pack)
        assert llm.runner.module.packed_weights is pack
        stacked = 1 if scan_layers else 0
        assert _kernel_ndims(llm.params) == {3 + stacked if pack else 2 + stacked}
        tied = "lm_head" not in llm.params
        assert llm.params["embed_tokens"]["embedding"].shape == ((32, 64, 16) if pack and tied else (512, 64))
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[pack] = ([o.outputs[0].token_ids for o in outs],
                      [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                       for o in outs])
    assert runs[True][0] == runs[False][0]
    tol = 1e-4 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.concatenate(runs[True][1]), np.concatenate(runs[False][1]), rtol=tol, atol=tol)


def test_pack_weights_needs_float32_or_bfloat16(tmp_path):
    """Explicitly asked for, packing that cannot happen is an error naming why; by default
    float16 weights stay unpacked (and float32 ones are packed)."""
    with pytest.raises(ValueError, match="pack_weights=True needs float32 or bfloat16"):
        _tiny_llm(tmp_path, dtype="float16", pack_weights=True)
    assert _kernel_ndims(_tiny_llm(tmp_path, dtype="float16").params) == {2}
    assert _kernel_ndims(_tiny_llm(tmp_path).params) == {3}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_traced_step_grows_with_depth_only_when_unrolled(scan_layers):
    """`scan_layers=True` traces one layer body whatever the depth (so compile time stays
    flat); unrolled, every layer adds its own equations."""
    from jpaged.attention.metadata import AttentionMetadata
    from jpaged.attention.xla import XlaBackend
    from jpaged.runner.input_builder import InputBuilder
    from jpaged.models import LlamaForCausalLM, ModelConfig

    def top_level_equations(num_layers):
        cfg = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8)
        backend = XlaBackend()
        module = LlamaForCausalLM(cfg, backend, scan_layers=scan_layers)
        inp = InputBuilder.dummy(16, 2, 16, 4)
        shape = backend.pool_shape(num_layers, 8, 16, cfg.num_kv_heads, cfg.head_dim)
        pool = (jax.ShapeDtypeStruct(shape, np.float32),) * 2
        args = (inp.token_ids, inp.positions, pool, AttentionMetadata.from_inputs(inp), inp.logits_index)
        params = jax.eval_shape(module.init, jax.random.key(0), *args)
        layer_keys = sorted(k for k in params["params"] if k.startswith("layers"))
        assert layer_keys == (["layers"] if scan_layers else sorted(f"layers_{i}" for i in range(num_layers)))
        return len(jax.make_jaxpr(module.apply)(params, *args).jaxpr.eqns)

    two, four = top_level_equations(2), top_level_equations(4)
    if scan_layers:
        assert two == four
    else:
        assert four > two + 20  # each layer: norms, projections, rope, attention, MLP


def test_stack_and_unstack_layers_round_trip():
    from jpaged.models.llama import stack_layers, unstack_layers
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": rng.random((5, 4))},
              **{f"layers_{i}": {"qkv_proj": {"kernel": rng.random((4, 6)), "bias": rng.random(6)},
                                 "attn_norm": {"scale": rng.random(4)}} for i in range(3)}}
    stacked = stack_layers(params, 3)
    assert set(stacked) == {"embed_tokens", "layers"}
    assert stacked["layers"]["qkv_proj"]["kernel"].shape == (3, 4, 6)
    np.testing.assert_array_equal(stacked["layers"]["attn_norm"]["scale"][2], params["layers_2"]["attn_norm"]["scale"])
    back = unstack_layers(stacked, 3)
    assert set(back) == set(params)
    for i in range(3):
        for leaf, want in zip(jax.tree_util.tree_leaves(back[f"layers_{i}"]),
                              jax.tree_util.tree_leaves(params[f"layers_{i}"])):
            np.testing.assert_array_equal(leaf, want)
    assert stack_layers(stacked, 3) is stacked and unstack_layers(params, 3) is params



def test_a_table_saves_nothing_once_xla_cache_was_consulted(tmp_path, monkeypatch):
    """Once XLA's persistent cache has served this process, jax may hand a compile the
    executable it read from there (no cache-hit event), which would load back broken."""
    import jax
    import jax.numpy as jnp

    from jpaged.runner import executables

    def lower():
        return jax.jit(lambda x: x * 3 + 1).lower(jnp.zeros(7, jnp.float32)), None

    fresh = executables.ExecutableTable(tmp_path / "a", "f" * 64)
    assert float(fresh.get("k", lower)(jnp.ones(7))[0]) == 4.0
    assert len(list(fresh.directory.glob("*.exe"))) == 1
    monkeypatch.setattr(executables, "_xla_cache_consulted", True)
    after = executables.ExecutableTable(tmp_path / "b", "f" * 64)
    assert float(after.get("k", lower)(jnp.ones(7))[0]) == 4.0
    assert not after.directory.exists()
    # what is on disk still loads
    assert executables.ExecutableTable(tmp_path / "a", "f" * 64)._find("k") is not None


def test_executables_saved_then_loaded_on_restart(tmp_path):
    """Warm-up saves every executable under the compilation cache dir; a second engine over
    the same model loads them all (compiling none) and generates the same tokens; another
    pool size (an argument shape the keys do not name) gets a folder of its own."""
    from jpaged.runner import executables
    assert not executables._xla_cache_consulted, \
        "an earlier test turned XLA's persistent cache on (an in-memory or sharded engine " \
        "without compilation_cache_dir=''): no table saves in this process"
    cache = tmp_path / "cache"
    model = tmp_path / "model"
    model.mkdir()
    first = _tiny_llm(model, compilation_cache_dir=str(cache))
    first.warmup(use_tqdm=False)
    needed = len(first.runner.executables_needed())
    table = first.runner.executables
    assert table.num_loaded == 0 and len(list(table.directory.glob("*.exe"))) == needed
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=6, logprobs=2)]
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    want = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
    del first

    second = _tiny_llm(model, compilation_cache_dir=str(cache))
    before = second.num_compilations()
    second.warmup(use_tqdm=False)
    assert second.runner.executables.num_loaded == needed
    assert second.num_compilations() - before == needed  # loaded, each counted once
    assert [o.outputs[0].token_ids for o in second.generate(prompts, params, use_tqdm=False)] == want
    assert second.num_compilations() - before == needed

    other = _tiny_llm(model, compilation_cache_dir=str(cache), kv_cache_memory=16 << 20)
    assert other.runner.executables.directory != second.runner.executables.directory
