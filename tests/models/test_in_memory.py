"""An in-memory model, as a research pipeline holds it: `jpaged.LLM(model=<Flax module>,
params=convert_state_dict(hf.state_dict(), hf.config), tokenizer=...)` generates the same
greedy tokens as the engine over the model's folder and as transformers, and its first-token
log-probabilities equal those of `causal_forward` (the training forward) on the same params."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jpaged import LLM, SamplingParams
from jpaged.models import LlamaForCausalLM, ModelConfig, causal_forward, convert_state_dict

from helpers import NoTokenizer, build_tiny_hf, hf_greedy

pytest.importorskip("torch")

ENGINE_ARGS = dict(tokenizer=NoTokenizer(), max_num_seqs=4, max_model_len=256,
                   kv_cache_memory=2 << 20, max_num_batched_tokens=64, compilation_cache_dir="")
PROMPTS = [[5, 77, 300, 12, 9], [1] + list(range(40, 61))]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, ModelConfig, params from its state dict, its folder)."""
    path = tmp_path_factory.mktemp("in-memory") / "llama"
    hf = build_tiny_hf("llama", path)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    return hf, config, convert_state_dict(hf.state_dict(), hf.config), str(path)


def test_in_memory_model_generates_like_its_folder_and_transformers(tiny):
    hf, config, params, path = tiny
    # The loader clones the module with the engine's attention backend: None will do here.
    in_memory = LLM(LlamaForCausalLM(config, None), params=params, **ENGINE_ARGS)
    assert in_memory.model_path is None
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outs = in_memory.generate(PROMPTS, sp, use_tqdm=False)
    from_folder = LLM(path, **ENGINE_ARGS).generate(PROMPTS, sp, use_tqdm=False)
    for prompt, out, ref in zip(PROMPTS, outs, from_folder):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_TOKENS)

    # The first generated token's top-5 log-probabilities against the training forward,
    # the prompts in one batch padded on the left.
    T = max(map(len, PROMPTS))
    ids = np.array([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = np.array([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    logp = np.asarray(jax.nn.log_softmax(causal_forward(config, params, ids, mask)[:, -1]))
    for row, out in enumerate(outs):
        top = out.outputs[0].logprobs[0]
        np.testing.assert_allclose([top[i].logprob for i in top], logp[row, list(top)], atol=2e-4)
