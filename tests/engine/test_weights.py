"""Weights swapped in place, pausing and sleeping (`EngineCore.get_weights`,
`update_weights`, `pause` / `resume`, `sleep` / `wake_up`), on the engine and through an
`AsyncEngine` streaming requests. Two tiny random Llamas of one shape: A and B."""
from __future__ import annotations

import asyncio
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PER_BLOCK, NoTokenizer, build_tiny_hf, hf_greedy

from jpaged import LLM, SamplingParams
from jpaged.engine.async_engine import AsyncEngine
from jpaged.exceptions import EngineStateError
from jpaged.models.loader import load_config, load_params

ENGINE = dict(tokenizer=NoTokenizer(), max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64,
              kv_cache_memory=64 * PER_BLOCK, block_size=16)
SHARED = [1] + list(range(100, 140))  # two full blocks and a tail, shared by every prompt
PROMPTS = [{"prompt_token_ids": SHARED + [7 + i]} for i in range(3)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    models = {name: build_tiny_hf("llama", root / name, seed=seed) for name, seed in (("a", 0), ("b", 1))}
    return root, models


@pytest.fixture(scope="module")
def llm(tiny):
    root, _ = tiny
    return LLM(str(root / "a"), compilation_cache_dir=str(root / "xla"), **ENGINE)


def tokens(llm, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_update_weights_in_place(tiny, llm):
    root, models = tiny
    old = tokens(llm)
    weights_a = llm.get_weights()
    assert llm.kv_cache_stats()["cached_blocks"] >= 2  # the shared prefix, computed with A
    compiles = llm.num_compilations()
    llm.update_weights(load_params(root / "b", load_config(root / "b")))  # numpy arrays
    new = tokens(llm)
    assert llm.num_compilations() == compiles
    assert new != old
    # B's tokens: a fresh engine on B (its executables come from the shared disk cache),
    # and transformers; A's cached prefix blocks were not reused
    assert tokens(LLM(str(root / "b"), compilation_cache_dir=str(root / "xla"), **ENGINE)) == new
    assert new[0] == hf_greedy(models["b"], PROMPTS[0]["prompt_token_ids"], 8)

    # A back, from the caller's jax arrays, which it then deletes (the engine copied them);
    # a weakly typed leaf (the norms are ones) does not make anything recompile
    weights = jax.device_put(weights_a)
    weights["norm"]["scale"] = jnp.full(weights["norm"]["scale"].shape, 1.0)
    assert weights["norm"]["scale"].weak_type
    np.testing.assert_array_equal(weights["norm"]["scale"], weights_a["norm"]["scale"])
    compiles = llm.num_compilations()
    llm.update_weights(weights)
    for x in jax.tree_util.tree_leaves(weights):
        x.delete()
    assert tokens(llm) == old
    assert llm.num_compilations() == compiles
    assert llm.weights_version == 2


def test_a_wrong_tree_is_refused_and_the_engine_keeps_serving(llm):
    before = tokens(llm)
    good = llm.get_weights()

    def changed(path, value):
        tree = jax.tree_util.tree_map(lambda x: x, good)
        node = tree
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return tree
    kernel = good["layers_1"]["o_proj"]["kernel"]
    cases = [(changed(("layers_1", "o_proj", "kernel"), None), "lack 'layers_1/o_proj/kernel'"),
             (changed(("layers_1", "o_proj", "kernel"), kernel[:, :32]), r"layers_1/o_proj/kernel.*shape \(64, 32\)"),
             (changed(("layers_1", "o_proj", "kernel"), kernel.astype(jnp.bfloat16)), "dtype bfloat16"),
             (changed(("layers_1", "extra"), kernel), "'layers_1/extra'.*no place"),
             ("not a tree", "not an array|nested dict")]
    for tree, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.update_weights(tree)
    assert tokens(llm) == before
    llm.update_weights({"params": good})  # flax's variables dict is taken too
    assert tokens(llm) == before


def test_pause_modes_on_the_engine(llm):
    long = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    weights = llm.get_weights()
    ids = [llm.add_request(p, long) for p in PROMPTS[:2]]
    llm.step()
    with pytest.raises(EngineStateError, match="pause"):
        llm.update_weights(weights)
    assert llm.pause("keep") == [] and llm.is_paused()
    lengths = [len(s.output_token_ids) for i in ids for s in llm.requests[i].seqs]
    held = llm.add_request(PROMPTS[2], long)  # waits for resume
    assert llm.step() == [] and [len(s.output_token_ids) for i in ids
                                 for s in llm.requests[i].seqs] == lengths
    assert all(s.block_table == [] for s in llm.requests[held].seqs)
    with pytest.raises(EngineStateError, match="resume"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    llm.update_weights(weights)  # paused: allowed, the kept requests go on with them
    llm.resume()
    done = {}
    while llm.has_unfinished_requests():
        done.update((o.request_id, o) for o in llm.step() if o.finished)
    assert sorted(done) == sorted(ids + [held])
    assert all(len(o.outputs[0].token_ids) == 24 for o in done.values())

    ids = [llm.add_request(p, long) for p in PROMPTS]
    llm.step()
    aborted = llm.pause("abort")
    assert sorted(o.request_id for o in aborted) == sorted(ids)
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in aborted)
    assert not llm.has_unfinished_requests() and llm.block_manager.num_used_blocks == 0
    llm.resume()

    ids = [llm.add_request(p, long) for p in PROMPTS[:2]]
    llm.step()
    finished = llm.pause("wait")  # runs them to the end here
    assert llm.is_paused() and not llm.has_unfinished_requests()
    assert sorted(o.request_id for o in finished) == sorted(ids)
    assert all(o.outputs[0].finish_reason == "length" for o in finished)
    llm.resume()
    with pytest.raises(ValueError, match="mode must be one of"):
        llm.pause("later")


def test_sleep_frees_the_pool_and_weights_and_wake_up_restores_them(llm):
    before = tokens(llm)
    weights = llm.get_weights()
    compiles = llm.num_compilations()
    pool, params = llm.runner.kv_pool, jax.tree_util.tree_leaves(llm.runner.params)
    live = sum(x.nbytes for x in jax.live_arrays())
    llm.sleep(level=1)
    assert all(x.is_deleted() for x in (*pool, *params))
    freed = live - sum(x.nbytes for x in jax.live_arrays())
    assert freed >= llm.runner.pool_bytes + sum(x.nbytes for x in params)
    assert llm.kv_cache_stats()["cached_blocks"] == 0  # the pool's contents are gone
    with pytest.raises(EngineStateError, match="asleep"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    with pytest.raises(EngineStateError, match="asleep already"):
        llm.sleep(level=2)
    llm.wake_up()
    assert tokens(llm) == before

    llm.sleep(level=2)
    assert llm._host_params is None
    llm.wake_up()
    with pytest.raises(EngineStateError, match="discarded by sleep"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.update_weights(weights)
    assert tokens(llm) == before
    assert llm.num_compilations() == compiles

    llm.add_request(PROMPTS[0], GREEDY)
    with pytest.raises(EngineStateError, match="in flight"):
        llm.sleep()
    llm.pause("abort")
    llm.resume()


def test_pause_update_and_resume_while_streaming(tiny, llm):
    """Through the AsyncEngine (the server's in-process engine): a request frozen by
    pause("keep") goes on after resume; "abort" ends a stream with finish_reason "abort";
    "wait" returns once the request in flight has finished; requests that came while
    paused run after resume. (Last in this module: the engine thread owns `llm`.)"""
    root, _ = tiny
    weights_b = load_params(root / "b", load_config(root / "b"))
    engine = AsyncEngine(llm)
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def scenario():
        outputs = []

        async def consume(prompt, params, sink):
            async for out in engine.generate(prompt, params):
                sink.append(out)
        task = asyncio.create_task(consume(PROMPTS[0], long, outputs))
        while not outputs:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineStateError, match="pause"):
            await asyncio.to_thread(engine.update_weights, weights_b)
        await asyncio.to_thread(engine.pause, "keep")
        assert await asyncio.to_thread(engine.is_paused)
        frozen = len(outputs)
        await asyncio.sleep(0.3)
        assert len(outputs) == frozen and not outputs[-1].finished
        await asyncio.to_thread(engine.update_weights, weights_b)
        await asyncio.to_thread(engine.resume)
        await task
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 40

        aborted: list = []
        task = asyncio.create_task(consume(PROMPTS[1], long, aborted))
        while not aborted:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.pause, "abort")
        await task
        assert aborted[-1].finished and aborted[-1].outputs[0].finish_reason == "abort"
        late: list = []
        task = asyncio.create_task(consume(PROMPTS[2], GREEDY, late))
        await asyncio.sleep(0.3)
        assert late == []  # paused: it waits
        await asyncio.to_thread(engine.resume)
        await task
        assert late[-1].finished

        waited: list = []
        task = asyncio.create_task(consume(PROMPTS[0], long, waited))
        while not waited:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.pause, "wait", 60)
        assert waited[-1].finished and waited[-1].outputs[0].finish_reason == "length"
        await asyncio.to_thread(engine.resume)
        await task
    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
