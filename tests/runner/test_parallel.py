"""Tensor parallelism (`tensor_parallel_size`): layouts that split and those that are
refused, and, on 4 CPU devices (a subprocess: the device count is fixed when jax starts),
the same greedy tokens, samples and beams at 1, 2 and 4 devices, a pool whose shards hold
only their KV heads, updated in place, and weights taken out and put back in place
(`get_weights` / `update_weights`) resharded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jpaged.models import ModelConfig
from jpaged.runner import parallel

DEFAULT_MODEL_SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


def test_the_default_model_splits_over_3_devices_and_refuses_2_and_4():
    config = ModelConfig(**DEFAULT_MODEL_SHAPE)
    assert parallel.plan_layout(config, 3) == config  # 3 query heads and 1 KV head each
    for size in (2, 4):
        with pytest.raises(ValueError, match=f"tensor_parallel_size={size} does not split this model: "
                                             f"its 9 query heads are not divisible by {size}"):
            parallel.plan_layout(config, size)
    with pytest.raises(ValueError, match="MLP width 1536"):  # 9 heads split, the MLP does not
        parallel.plan_layout(config, 9)


def test_fewer_kv_heads_than_devices_are_repeated():
    config = ModelConfig(**{**DEFAULT_MODEL_SHAPE, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 64})
    assert parallel.plan_layout(config, 4).num_kv_heads == 4
    assert parallel.plan_layout(config, 8).num_kv_heads == 8
    with pytest.raises(ValueError, match="3 KV heads"):
        parallel.plan_layout(ModelConfig(**{**DEFAULT_MODEL_SHAPE, "num_heads": 6}), 2)


def test_fused_columns_are_regrouped_per_device():
    """q heads 0-3, k heads 0-1, v heads 0-1 (head_dim 1) over 2 devices, then over 4 with
    each KV head repeated; gate and up columns likewise; one device: unchanged."""
    config = ModelConfig(**{**DEFAULT_MODEL_SHAPE, "num_heads": 4, "num_kv_heads": 2, "head_dim": 1,
                            "intermediate_size": 4})
    qkv = np.array([[0, 1, 2, 3, 10, 11, 20, 21]])
    gate_up = np.array([[0, 1, 2, 3, 10, 11, 12, 13]])
    params = {"layers_0": {"qkv_proj": {"kernel": qkv}, "gate_up_proj": {"kernel": gate_up},
                           "o_proj": {"kernel": np.eye(4)}}}

    def regrouped(size):
        out = parallel.regroup_params(params, config, parallel.plan_layout(config, size), size)["layers_0"]
        assert out["o_proj"]["kernel"] is params["layers_0"]["o_proj"]["kernel"]
        return out["qkv_proj"]["kernel"].tolist()[0], out["gate_up_proj"]["kernel"].tolist()[0]
    assert regrouped(1) == (qkv.tolist()[0], gate_up.tolist()[0])
    assert regrouped(2) == ([0, 1, 10, 20, 2, 3, 11, 21], [0, 1, 10, 11, 2, 3, 12, 13])
    assert regrouped(4) == ([0, 10, 20, 1, 10, 20, 2, 11, 21, 3, 11, 21], [0, 10, 1, 11, 2, 12, 3, 13])


WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import jax
    import numpy as np
    import jpaged
    from jpaged.models.loader import load_params
    from helpers import NoTokenizer
    rng_prompts = [[1] + [(7 * i + 3) % 500 for i in range(40)],  # chunked: 16-token steps
                   [1, 44, 45], [1, 44, 45, 46, 200]]
    shared = [1] + list(range(100, 132))  # two full blocks, then a different tail each
    results = {{}}
    greedy = jpaged.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def make(backend, tp, cache=""):
        return jpaged.LLM({path!r}, tokenizer=NoTokenizer(), attention_backend=backend,
                          tensor_parallel_size=tp, max_num_seqs=4, max_model_len=128,
                          max_num_batched_tokens=16, kv_cache_memory=1 << 20,
                          compilation_cache_dir=cache)
    for backend in {backends!r}:
        for tp in (1, 2, 4):
            # at 2, through a compilation cache, which a restart below reads
            llm = make(backend, tp, {cache!r} if tp == 2 else "")
            out = [r.outputs[0].token_ids for r in llm.generate(rng_prompts, greedy, use_tqdm=False)]
            llm.generate([shared + [5]], greedy, use_tqdm=False)
            hit = llm.generate([shared + [6, 7]], greedy, use_tqdm=False)  # its prefix is cached
            two = llm.generate([rng_prompts[1]], jpaged.SamplingParams(
                temperature=0, n=2, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
            beams = llm.beam_search([{{"prompt_token_ids": rng_prompts[2]}}],
                                    jpaged.BeamSearchParams(beam_width=2, max_tokens=6))[0]
            # weights out and back in, resharded into place: the same numbers, no compile
            canonical = load_params({path!r}, llm.weights.config)
            got = llm.get_weights()
            weights_equal = jax.tree_util.tree_all(jax.tree_util.tree_map(
                lambda a, b: bool((np.asarray(a) == b).all()), got, canonical))
            compiles = llm.num_compilations()
            llm.update_weights(got)
            roundtrip = [r.outputs[0].token_ids for r in llm.generate(rng_prompts, greedy, use_tqdm=False)]
            k = llm.runner.kv_pool[0]
            mem = llm.runner.step_memory_analysis((16, 4, 16, 8)) if tp == 2 else None
            stats = llm.kv_cache_stats()
            results[f"{{backend}}-{{tp}}"] = dict(
                greedy=out, hit=hit[0].outputs[0].token_ids,
                hit_rate=stats["prefix_cache_hit_rate"],
                samples=[c.token_ids for c in two.outputs],
                beams=[list(s.tokens) for s in beams.sequences],
                shard_heads=[s.data.shape[llm.runner.backend.head_axis] for s in k.addressable_shards],
                kv_heads=llm.model_config.num_kv_heads, pool_bytes=stats["pool_bytes"],
                pool_bytes_per_device=stats["pool_bytes_per_device"],
                weight_bytes_per_device=stats["weight_bytes_per_device"],
                temp=mem and mem.temp_size_in_bytes, alias=mem and mem.alias_size_in_bytes,
                weights_equal=weights_equal, roundtrip=roundtrip,
                update_compiles=llm.num_compilations() - compiles)
            del llm
        if {restart!r}:
            restarted = make(backend, 2, {cache!r})
            results[f"{{backend}}-2"]["restart"] = [
                r.outputs[0].token_ids for r in restarted.generate(rng_prompts, greedy, use_tqdm=False)]
            del restarted
    print("RESULTS" + json.dumps(results))
""")


def run_on_four_devices(tmp_path, backends, restart: bool = False) -> dict:
    from helpers import build_tiny_hf
    path = tmp_path / "tiny"
    build_tiny_hf("llama", path)  # 4 heads, 2 KV heads: KV heads repeated at 4 devices
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = WORKER.format(tests=os.path.dirname(os.path.dirname(__file__)), backends=backends, path=str(path),
                         cache=str(tmp_path / "cache"), restart=restart)
    # run from tmp_path: from the checkout's root, `import jpaged` would find its source
    # tree, which lacks the installed jpaged.models
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def check_same_tokens(results: dict, backends) -> None:
    base = results[f"{backends[0]}-1"]
    for key, r in results.items():
        for field in ("greedy", "hit", "samples", "beams"):
            assert r[field] == base[field], (key, field)
        assert r["hit_rate"] > 0, key  # the second shared prompt reused the cached blocks
        # get_weights gives the loaded numbers back; update_weights takes them back in place
        assert r["weights_equal"] and r["roundtrip"] == base["greedy"], key
        assert r["update_compiles"] == 0, key


@pytest.mark.parametrize("backends,restart", [(("cpu",), False),
                                              pytest.param(("xla",), True, marks=pytest.mark.slow)])
def test_one_two_and_four_devices_give_the_same_tokens(tmp_path, backends, restart):
    """(Behind -m slow, also a restart through the compilation cache: a sharded executable
    loaded back from jpaged's own executable store refused host inputs.)"""
    results = run_on_four_devices(tmp_path, list(backends), restart)
    check_same_tokens(results, backends)
    for backend in backends:
        one = results[f"{backend}-1"]
        for tp in (2, 4):
            r = results[f"{backend}-{tp}"]
            # each device holds its share of the (repeated, at 4) KV heads and nothing more
            assert r["kv_heads"] == max(2, tp) and r["shard_heads"] == [r["kv_heads"] // tp] * tp
            assert r["pool_bytes_per_device"] * tp == r["pool_bytes"]
            assert r["weight_bytes_per_device"] < one["weight_bytes_per_device"]
        # in place: the donated pool shards are the outputs, and no temporary is as large as
        # one of them (K or V, each half of the bytes): neither was copied
        r = results[f"{backend}-2"]
        if restart:  # a restart reads the sharded steps from the cache
            assert r["restart"] == r["greedy"]
        assert r["alias"] >= r["pool_bytes_per_device"] and r["temp"] < r["pool_bytes_per_device"] // 2, r


@pytest.mark.slow
def test_the_pallas_kernels_split_too(tmp_path):
    check_same_tokens(run_on_four_devices(tmp_path, ["pallas-interpret"]), ["pallas-interpret"])


DEFAULT_MODEL_WORKER = textwrap.dedent("""
    import json
    import jpaged
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List three primes."]
    greedy = jpaged.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = {{}}
    for tp in (1, 3):
        llm = jpaged.LLM(None, tensor_parallel_size=tp, attention_backend={backend!r}, max_num_seqs=4,
                         max_model_len=1024, kv_cache_memory=256 << 20, compilation_cache_dir="")
        tokens[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        del llm
    print("RESULTS" + json.dumps(tokens))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "xla"])
def test_the_default_model_gives_the_same_tokens_on_3_devices(tmp_path, backend):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", DEFAULT_MODEL_WORKER.format(backend=backend)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))[len("RESULTS"):])
    assert tokens["1"] == tokens["3"] and all(len(t) == 32 for t in tokens["1"])
