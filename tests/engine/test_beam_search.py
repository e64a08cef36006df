"""Beam search: the beams equal transformers' `generate(num_beams=W, do_sample=False)` (same
length penalty and early stopping), beams share blocks, and dropping beams frees them.

jpaged follows transformers' beam search step for step (see jpaged/beam_search.py), so
the comparison holds with EOS and any length_penalty / early_stopping; the default model
test runs the chat prompts that end early (EOS) as well as ones that hit max_tokens."""
from __future__ import annotations

import pytest

from jpaged import BeamSearchParams

from helpers import tiny_llm, tiny_model_path


def _hf_beams(hf, prompt, width, max_tokens, eos, length_penalty, early_stopping):
    import torch
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          num_beams=width, num_return_sequences=width, do_sample=False,
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True)
    return [s[len(prompt):].tolist() for s in out.sequences], out.sequences_scores.tolist()


def _compare(outs, prompts, hf, width, max_tokens, eos, length_penalty, early_stopping):
    for prompt, out in zip(prompts, outs):
        want, scores = _hf_beams(hf, prompt, width, max_tokens, eos, length_penalty, early_stopping)
        got = [s.output_token_ids for s in out.sequences]
        fill = 0 or eos[0]  # what HF pads finished beams with (pad_token_id=0 is falsy there)
        assert all(set(w[len(g):]) <= {fill} for w, g in zip(want, got))
        want = [w[:len(g)] for w, g in zip(want, got)]
        assert got[0] == want[0]  # the best beam
        assert got == want  # every beam
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-3)


@pytest.fixture(scope="module")
def tiny_hf():
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_path(), dtype=torch.float32).eval()


def test_beams_share_blocks_and_free_them():
    llm = tiny_llm()
    prompt = [(5 * j) % 500 + 3 for j in range(37)]
    seen = []
    step = llm.step

    def recording_step():
        out = step()
        seen.append(llm.kv_cache_stats())
        return out

    llm.step = recording_step
    try:
        out = llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=40, ignore_eos=True))[0]
    finally:
        del llm.step
    assert len(out.sequences) == 4 and all(len(s.output_token_ids) == 40 for s in out.sequences)
    assert [s.score for s in out.sequences] == sorted((s.score for s in out.sequences), reverse=True)
    assert all(s.tokens[:37] == prompt for s in out.sequences)
    # while running, 4 beams of up to 77 tokens would need 4 * 5 blocks unshared
    assert max(s["logical_blocks"] for s in seen) >= 16
    assert max(s["logical_blocks"] - s["used_blocks"] for s in seen) >= 8  # at least the prompt's
    assert llm.block_manager.num_used_blocks == 0 and not llm.has_unfinished_requests()


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (2.0, True), (-0.5, "never")])
def test_tiny_model_beams_match_transformers_with_early_eos(tiny_hf, length_penalty, early_stopping):
    llm = tiny_llm()
    prompts = [[(7 * j + 5 * i) % 500 + 3 for j in range(13 + 6 * i)] for i in range(2)]
    base = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True))
    # EOS := tokens the beams produce, so that hypotheses finish early and compete
    eos = sorted({base[0].sequences[0].output_token_ids[3], base[1].sequences[1].output_token_ids[5]})
    saved = llm.eos_token_ids
    llm.eos_token_ids = set(eos)
    try:
        outs = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=12,
                                                         length_penalty=length_penalty,
                                                         early_stopping=early_stopping))
    finally:
        llm.eos_token_ids = saved
    assert any(len(s.output_token_ids) < 12 for o in outs for s in o.sequences)
    _compare(outs, prompts, tiny_hf, 3, 12, eos, length_penalty, early_stopping)


@pytest.mark.slow
@pytest.mark.parametrize("width,length_penalty,early_stopping", [(3, 1.0, False), (4, 0.5, True)])
def test_default_model_beams_match_transformers_sweep(default_model_path, width, length_penalty,
                                                      early_stopping):
    _default_model_case(default_model_path, ["Say OK.", "What is 2+2?", "Name a color.",
                                             "Write a haiku about the sea."],
                        width, 24, length_penalty, early_stopping)


def test_default_model_beams_match_transformers(default_model_path):
    # Two beams end with EOS (after 8 and 9 tokens), the third hits max_tokens.
    outs = _default_model_case(default_model_path, ["What is 2+2?"], 3, 10, 1.0, False)
    assert {s.finish_reason for s in outs[0].sequences} == {"stop", "length"}


_DEFAULT = {}


def _default_model_case(path, questions, width, max_tokens, length_penalty, early_stopping):
    import transformers
    from jpaged import LLM
    if not _DEFAULT:
        _DEFAULT["llm"] = LLM(max_num_seqs=8, max_model_len=256, kv_cache_memory=32 << 20, dtype="float32",
                              max_num_batched_tokens=128)
        _DEFAULT["hf"] = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype="float32").eval()
    llm, hf = _DEFAULT["llm"], _DEFAULT["hf"]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False) for q in questions]
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                           BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                            length_penalty=length_penalty, early_stopping=early_stopping))
    _compare(outs, prompts, hf, width, max_tokens, sorted(llm.eos_token_ids), length_penalty, early_stopping)
    assert outs[0].sequences[0].text.strip()
    return outs


def test_bad_beam_params_raise():
    llm = tiny_llm()
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.beam_search([[5, 6, 7]], BeamSearchParams(beam_width=llm.config.max_num_seqs + 1, max_tokens=4))
    saved, llm.config.max_logprobs = llm.config.max_logprobs, 3  # width + one EOS id needs 4
    try:
        with pytest.raises(ValueError, match="max_logprobs"):
            llm.beam_search([[5, 6, 7]], BeamSearchParams(beam_width=3, max_tokens=4))
    finally:
        llm.config.max_logprobs = saved
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    assert not llm.has_unfinished_requests()
