"""End to end: the engine on the Pallas kernels (interpret mode, CPU) gives the
same greedy tokens as on the `xla` backend, on a tiny random Llama with GQA.

The prompts cover a prompt shorter than one block, prompts spanning several
blocks, and prompts longer than `max_num_batched_tokens`, whose prefill is
chunked (the ragged kernel then reads the cached pages of earlier chunks);
decode steps batch all four sequences (the decode kernel)."""
from __future__ import annotations

import pytest

from jpaged import LLM, SamplingParams

from helpers import build_tiny_hf
from helpers import NoTokenizer

PROMPT_LENS = [5, 23, 45, 77]  # 45 and 77 > max_num_batched_tokens: chunked prefill
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_hf("llama", path, vocab_size=512)
    return str(path)


def _generate(path, backend):
    llm = LLM(path, tokenizer=NoTokenizer(), attention_backend=backend, max_num_seqs=4,
              max_model_len=128, max_num_batched_tokens=32, kv_cache_memory=1 << 20,
              compilation_cache_dir="")
    assert llm.runner.backend.name == backend
    prompts = [[(13 * i + 7 * j) % 500 + 3 for j in range(n)] for i, n in enumerate(PROMPT_LENS)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.block_manager.num_used_blocks == 0
    return [o.outputs[0].token_ids for o in outs]


def test_pallas_interpret_greedy_matches_xla(tiny_llama):
    assert max(PROMPT_LENS) > 32  # some prompts prefill in chunks
    expected = _generate(tiny_llama, "xla")
    got = _generate(tiny_llama, "pallas-interpret")
    assert all(len(t) == MAX_TOKENS for t in got)
    assert got == expected
