"""What RL and evaluation read from a generation: prompt logprobs and sampled logprobs
against transformers (chunked prefill, n=2, a cached prefix not reused), the engine's
logprobs_mode (raw logits, processed logits; beam search stays raw), detokenize=False, and
seeded sampling that does not depend on the batch. On the shared tiny Llama (`tiny_llm`:
prefill chunks of 128 tokens)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from jpaged import BeamSearchParams, SamplingParams
from jpaged.exceptions import InvalidRequestError

from helpers import tiny_llm, tiny_model_path


@functools.lru_cache(maxsize=None)
def hf_model():
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_path(),
                                                             torch_dtype="float32").eval()


def hf_logits(ids: list[int]) -> np.ndarray:
    """transformers' logits f32[len(ids), V]: row j predicts token j + 1."""
    import torch
    with torch.no_grad():
        return hf_model()(torch.tensor([ids])).logits[0].float().numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    import torch
    return torch.log_softmax(torch.from_numpy(x), -1).numpy()


def own_logprobs(prompt_logprobs, prompt: list[int]) -> list[float]:
    """Each prompt token's own logprob (the first token has none)."""
    return [e[t].logprob for e, t in zip(prompt_logprobs[1:], prompt[1:])]


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def test_prompt_and_sampled_logprobs_equal_transformers():
    llm = tiny_llm()
    prompt = _prompt(150, 0)  # prefilled in two chunks (128 + 22)
    params = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=5, ignore_eos=True,
                            logprobs=2, prompt_logprobs=3)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    ref = log_softmax(hf_logits(prompt))
    for j in range(1, len(prompt)):
        entry, want = plp[j], ref[j - 1]
        top = np.argsort(-want)[:3]
        assert set(entry) == {prompt[j], *top.tolist()}
        np.testing.assert_allclose([entry[t].logprob for t in top], want[top], atol=1e-4)
        assert [entry[t].rank for t in top] == [1, 2, 3]
        np.testing.assert_allclose(entry[prompt[j]].logprob, want[prompt[j]], atol=1e-4)
        if prompt[j] not in top:
            assert entry[prompt[j]].rank == int((want >= want[prompt[j]]).sum())
    assert len({tuple(c.token_ids) for c in out.outputs}) == 2  # two different samples
    for comp in out.outputs:
        ref = log_softmax(hf_logits(prompt + comp.token_ids))[len(prompt) - 1:-1]
        want = ref[np.arange(len(comp.token_ids)), comp.token_ids]
        got = [entry[t].logprob for entry, t in zip(comp.logprobs, comp.token_ids)]
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(comp.cumulative_logprob, want.sum(), atol=1e-3)
    # The same prompt again: its blocks are cached now, but a request with prompt logprobs
    # computes every position (no cache lookup); one without reuses them.
    cache = llm.block_manager.prefix_cache
    hits = cache.hit_tokens
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
                         use_tqdm=False)[0]
    assert cache.hit_tokens == hits
    assert [set(e) for e in again.prompt_logprobs[1:]] == [{t} for t in prompt[1:]]
    np.testing.assert_allclose(own_logprobs(again.prompt_logprobs, prompt),
                               own_logprobs(plp, prompt), atol=1e-5)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert cache.hit_tokens > hits


def test_prompt_logprobs_are_recorded_once_across_recompute():
    """After a recompute preemption the prompt is computed again from position 0: the
    positions already recorded are not asked for again, the last prompt position never."""
    from jpaged.core.scheduler_output import SchedulerOutput
    from jpaged.core.sequence import Request, Sequence
    from jpaged.engine.output_processor import prompt_logprob_rows
    request = Request("r", None, list(range(10)), SamplingParams(prompt_logprobs=1), 0.0)
    request.prompt_logprobs = [None] + [{}] * 6  # positions 0..5 recorded
    seq = Sequence(request, list(range(10)) + [7], 10)
    assert prompt_logprob_rows(SchedulerOutput([seq], [11], is_prefill=True)) == [(seq, 6, 3)]
    seq.num_computed_tokens = 4
    assert prompt_logprob_rows(SchedulerOutput([seq], [2], is_prefill=True)) == []
    request.prompt_logprobs = [None] + [{}] * 9  # all of them
    assert prompt_logprob_rows(SchedulerOutput([seq], [7], is_prefill=True)) == []


def test_raw_and_processed_logits_modes_and_beam_search_stays_raw():
    """raw_logits: the sampled and top logprobs are transformers' logits; processed_logits:
    the tempered, top-k-filtered ones (filtered -inf), the sampled token's always finite.
    Prompt logprobs stay raw logprobs, and beam search (which ranks by raw logprobs) gives
    the same beams whatever the mode."""
    llm = tiny_llm()
    prompt = _prompt(40, 1)
    beam = BeamSearchParams(beam_width=2, max_tokens=4)
    want_beams = [s.tokens for s in llm.beam_search([prompt], beam)[0].sequences]
    try:
        for mode in ("raw_logits", "processed_logits"):
            llm.config.logprobs_mode = llm.runner.logprobs_mode = mode
            params = SamplingParams(temperature=0.7, top_k=5, seed=3, max_tokens=3, logprobs=4,
                                    prompt_logprobs=1, ignore_eos=True)
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            comp = out.outputs[0]
            logits = hf_logits(prompt + comp.token_ids)
            for i, (entry, t) in enumerate(zip(comp.logprobs, comp.token_ids)):
                x = logits[len(prompt) - 1 + i]
                if mode == "processed_logits":
                    x = np.where(x >= np.sort(x)[-5], x / 0.7, -np.inf)
                assert np.isfinite(entry[t].logprob)
                np.testing.assert_allclose(entry[t].logprob, x[t], rtol=1e-5, atol=1e-4)
                top = sorted((v for v in entry.values() if v.rank), key=lambda v: v.rank)
                np.testing.assert_allclose([v.logprob for v in top], np.sort(x)[::-1][:4],
                                           rtol=1e-5, atol=1e-4)
            lsm = log_softmax(hf_logits(prompt))
            np.testing.assert_allclose(own_logprobs(out.prompt_logprobs, prompt),
                                       lsm[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)
            assert [s.tokens for s in llm.beam_search([prompt], beam)[0].sequences] == want_beams
    finally:
        llm.config.logprobs_mode = llm.runner.logprobs_mode = "raw_logprobs"


def test_seeded_request_ignores_its_batch_and_arrival_order():
    """A seeded sampled request (temperature 1, top_p 0.9) gives the same tokens alone, among
    5 others of other lengths (other step buckets) first and last."""
    llm = tiny_llm()
    target = (_prompt(37, 2), SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=12,
                                             ignore_eos=True))
    others = [(_prompt(n, 3 + n), SamplingParams(temperature=0.8, max_tokens=m, ignore_eos=True))
              for n, m in ((5, 20), (90, 6), (140, 9), (17, 14), (60, 3))]
    runs = [[target], [target] + others, others[:3] + [target] + others[3:], others + [target]]
    got = []
    for batch in runs:
        outs = llm.generate([p for p, _ in batch], [sp for _, sp in batch], use_tqdm=False)
        got.append(outs[batch.index(target)].outputs[0].token_ids)
    assert all(g == got[0] for g in got), got


def test_detokenize_false_and_stop_strings():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(stop=["x"], detokenize=False)
    assert e.value.param == "stop"
    with pytest.raises(InvalidRequestError) as e:
        tiny_llm().generate([[5, 6]], SamplingParams(prompt_logprobs=10**6), use_tqdm=False)
    assert e.value.param == "prompt_logprobs"
