"""End to end: greedy tokens equal transformers', on the default model and on tiny
random Llama / Qwen2 / Mistral folders; preemption and bad input leave outputs intact."""
from __future__ import annotations

import json

import flax.linen
import jax
import pytest

import jpaged
from jpaged import LLM, SamplingParams

from helpers import NoTokenizer, build_tiny_hf, hf_greedy

PROMPTS = [
    "Hello",
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "Explain, step by step, how a refrigerator keeps food cold, and why it needs electricity.",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "def fibonacci(n):",
    "List three uses of copper in electrical engineering and describe each of them in one sentence, "
    "then summarise which property of copper matters most for all of them.",
]


@pytest.fixture(scope="module")
def default_llm():
    return LLM(max_num_seqs=8, max_model_len=512, kv_cache_memory=64 << 20, dtype="float32")


@pytest.fixture(scope="module")
def hf_default_model(default_model_path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype="float32").eval()


def test_default_model_greedy_matches_transformers(default_llm, hf_default_model):
    tok = default_llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = default_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_default_model, prompt, 64)
        assert out.outputs[0].finish_reason == "length"
    assert default_llm.block_manager.num_used_blocks == 0  # everything freed


@pytest.mark.parametrize("kind,scan_layers", [("llama", False), ("qwen2", False), ("mistral", False),
                                              ("llama-mha", False), ("qwen2", True)])
def test_tiny_hf_folder_greedy_matches_transformers(kind, scan_layers, tmp_path):
    hf = build_tiny_hf(kind, tmp_path, vocab_size=512)
    llm = LLM(str(tmp_path), tokenizer=NoTokenizer(), max_num_seqs=4, max_model_len=256,
              kv_cache_memory=4 << 20, max_num_batched_tokens=64, compilation_cache_dir="",
              scan_layers=scan_layers)
    num_layers = llm.model_config.num_layers
    layer_keys = [k for k in llm.params if k.startswith("layers")]
    if scan_layers:  # one stacked tree, every leaf with a leading layer axis
        assert layer_keys == ["layers"]
        assert all(x.shape[0] == num_layers for x in jax.tree_util.tree_leaves(llm.params["layers"]))
    else:
        assert sorted(layer_keys) == sorted(f"layers_{i}" for i in range(num_layers))
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([5, 17, 40, 90, 130])]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)  # 90 and 130 prefill in chunks of 64
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24)


def test_in_memory_flax_model_either_layer_layout(tmp_path):
    """A research pipeline's own module and params (unrolled or scanned layout, with or
    without the {"params": ...} wrapper) generate transformers' greedy tokens; the engine's
    `scan_layers` overrides the module's and converts the params."""
    from jpaged.models import LlamaForCausalLM
    from jpaged.models.llama import stack_layers
    from jpaged.models.loader import load_config, load_params
    hf = build_tiny_hf("llama", tmp_path, vocab_size=512)
    cfg = load_config(tmp_path)
    params = load_params(tmp_path, cfg)
    prompts = [[(5 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate([4, 23, 51])]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    common = dict(tokenizer=NoTokenizer(), max_num_seqs=4, max_model_len=128,
                  kv_cache_memory=2 << 20, max_num_batched_tokens=64, compilation_cache_dir="")
    cases = [(LlamaForCausalLM(cfg, None), {"params": params}, {}, False),
             (LlamaForCausalLM(cfg, None, scan_layers=True), stack_layers(params, cfg.num_layers), {}, True),
             (LlamaForCausalLM(cfg, None, scan_layers=True), stack_layers(params, cfg.num_layers),
              {"scan_layers": False}, False)]
    for module, tree, override, scanned in cases:
        llm = LLM(module, params=tree, **common, **override)
        assert llm.runner.module.scan_layers is scanned
        assert ("layers" in llm.params) is scanned and ("layers_0" in llm.params) is not scanned
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected

    class NoScanField(flax.linen.Module):  # a user's own model without the option
        config: object
        backend: object = None
    with pytest.raises(ValueError, match="scan_layers=True needs a model with a `scan_layers` field"):
        LLM(NoScanField(cfg), params=params, scan_layers=True, **common)
    with pytest.raises(ValueError, match="scan_layers must be a bool"):
        jpaged.EngineConfig(scan_layers=1)


def test_preemption_keeps_outputs_identical(tmp_path):
    build_tiny_hf("llama", tmp_path, vocab_size=512)
    prompts = [[(11 * i + j) % 500 + 3 for j in range(20 + 9 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    common = dict(tokenizer=NoTokenizer(), max_num_seqs=6, max_model_len=256, block_size=8,
                  compilation_cache_dir="")
    big = LLM(str(tmp_path), kv_cache_memory=8 << 20, **common)
    expected = [o.outputs[0].token_ids for o in big.generate(prompts, params, use_tqdm=False)]
    per_block = 2 * 3 * 8 * 2 * 16 * 4  # K+V, layers, block, kv heads, head dim, float32
    small = LLM(str(tmp_path), kv_cache_memory=40 * per_block, **common)  # 320 tokens for ~600 needed
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.scheduler.num_preemptions > 0
    assert got == expected
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_bad_input_raises_clear_errors_and_engine_goes_on(default_llm):
    llm = default_llm
    good = SamplingParams(temperature=0.0, max_tokens=8)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 600}, good, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", good, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 2, 10**9]}, good, use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate(["fine", {"prompt_token_ids": [-1]}], good, use_tqdm=False)
    for bad in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(n=0),
                dict(top_k=0), dict(max_tokens=0), dict(min_p=2.0), dict(repetition_penalty=0.0)]:
        with pytest.raises(ValueError, match="SamplingParams." + next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises((FileNotFoundError, ValueError), match="no/such/model"):
        LLM("/no/such/model")
    assert llm.block_manager.num_used_blocks == 0 and not llm.scheduler.has_unfinished()
    out = llm.generate("Hello", good, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 1


def test_stop_conditions(default_llm):
    llm = default_llm
    base = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=24),
                        use_tqdm=False)[0].outputs[0]
    assert len(base.text) > 4
    stop = base.text[2:4]
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:base.text.find(stop)]
    kept = llm.generate("Count: 1, 2, 3,", SamplingParams(
        temperature=0.0, max_tokens=24, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[:base.text.find(stop) + len(stop)]
    tid = base.token_ids[3]
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=24,
                                                         stop_token_ids=[tid]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(tid) + 1] and out.stop_reason == tid
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_whatever_the_batch(default_llm):
    llm = default_llm
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    alone = llm.generate("Tell me a story", p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16)
    batch = llm.generate(["Hi", "Tell me a story", "Why?"], [others, p, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_logprobs_and_cumulative_logprob(default_llm):
    out = default_llm.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3),
                               use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and len(entry) >= 3
        ranked = sorted((lp.rank, lp.logprob) for lp in entry.values() if lp.rank)
        assert [r for r, _ in ranked] == [1, 2, 3]
        assert entry[token].logprob == pytest.approx(ranked[0][1])  # greedy takes the top token
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_chat_and_stats(default_llm):
    outs = default_llm.chat([{"role": "user", "content": "Say hi"}],
                            SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert outs[0].outputs[0].text
    stats = default_llm.kv_cache_stats()
    assert stats["used_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"]
    assert isinstance(jpaged.__version__, str)


def test_min_tokens_bans_eos_until_reached(default_llm):
    llm = default_llm
    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say OK."}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    free = llm.generate({"prompt_token_ids": chat}, SamplingParams(temperature=0.0, max_tokens=40),
                        use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "stop" and len(free.token_ids) < 20  # the model stops early
    out = llm.generate({"prompt_token_ids": chat}, SamplingParams(temperature=0.0, max_tokens=40,
                                                                  min_tokens=20), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 20
    assert not set(out.token_ids[:20]) & llm.eos_token_ids


def test_pool_that_cannot_hold_one_request_says_what_to_change(tmp_path):
    build_tiny_hf("llama", tmp_path, vocab_size=512)
    with pytest.raises(ValueError, match="raise kv_cache_memory to at least .* or lower max_model_len"):
        LLM(str(tmp_path), tokenizer=NoTokenizer(), max_model_len=256, kv_cache_memory=10_000,
            compilation_cache_dir="")
    with pytest.raises(ValueError, match="more than the .* bytes of memory available"):
        LLM(str(tmp_path), tokenizer=NoTokenizer(), max_model_len=256, kv_cache_memory=1 << 50,
            compilation_cache_dir="")


def test_requests_without_params_take_the_generation_defaults(default_llm, tmp_path):
    """No SamplingParams: the model's generation_config.json when it sets any sampling field,
    else jpaged's default (greedy, so a small instruct model answers sensibly);
    SamplingParams() itself keeps vLLM's defaults."""
    assert SamplingParams().temperature == 1.0
    assert default_llm.default_sampling_params() == SamplingParams(temperature=0.0)
    answer = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                              use_tqdm=False)[0].outputs[0]
    assert "Paris" in answer.text
    build_tiny_hf("llama", tmp_path, vocab_size=512)
    gen_file = tmp_path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen_file.write_text(json.dumps({**gen, "temperature": 0.7, "top_k": 5, "max_new_tokens": 7,
                                    "do_sample": True}))
    llm = LLM(str(tmp_path), tokenizer=NoTokenizer(), max_num_seqs=2, max_model_len=64,
              kv_cache_memory=1 << 20, compilation_cache_dir="")
    want = SamplingParams(temperature=0.7, top_k=5, max_tokens=7)
    assert llm.default_sampling_params() == want
    request_id = llm.add_request([5, 6, 7])
    assert llm.requests[request_id].params == want
    llm.abort_request(request_id)
    out = llm.generate([[5, 6, 7]], use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 or out.finish_reason == "stop"
