"""The engine-core process's messages: the per-step deltas, through msgpack and back, rebuild
exactly the RequestOutputs that `LLM.step` gives (tokens, text cut by stop strings, logprobs
with ranks, finish reasons, best_of > n picking its best), and errors keep their types."""
from __future__ import annotations

import msgspec
import pytest

from jpaged.engine.messages import (AddRequest, FromCore, Outputs, OutputAccumulator, RequestError,
                                    ToCore, error_message, params_to_dict, rebuild_error,
                                    request_delta)
from jpaged.exceptions import ContextLengthExceededError, EngineStepError, InvalidRequestError
from jpaged.sampling_params import SamplingParams

from helpers import TINY_SERVER_ARGS


@pytest.fixture(scope="module")
def tiny_llm(tiny_text_model):
    from jpaged import LLM
    return LLM(tiny_text_model, **TINY_SERVER_ARGS)


PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, n=2, max_tokens=9, logprobs=2, seed=1),
    SamplingParams(temperature=1.0, n=2, best_of=3, max_tokens=6, seed=2),
    SamplingParams(temperature=0, max_tokens=40, stop=["e", " the"], ignore_eos=True),
    SamplingParams(temperature=0.7, max_tokens=20, stop=["a"], include_stop_str_in_output=True,
                   seed=3, logprobs=0),
    SamplingParams(temperature=0, max_tokens=4, logprobs=1, prompt_logprobs=2, detokenize=False),
    SamplingParams(temperature=0.9, n=2, best_of=3, max_tokens=3, seed=4, logprobs=1,
                   prompt_logprobs=0),
]


def test_deltas_rebuild_what_llm_step_gives(tiny_llm):
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
    accumulators, finished, steps = {}, set(), 0
    for i, params in enumerate(PARAMS):
        prompt = f"prompt {i} about the sea"
        rid = tiny_llm.add_request(prompt, params, request_id=f"r{i}")
        ids = tiny_llm.requests[rid].prompt_token_ids
        accumulators[rid] = OutputAccumulator(rid, prompt, ids)
    while tiny_llm.has_unfinished_requests():
        requests = tiny_llm.step_requests()
        steps += 1
        msg = decoder.decode(encoder.encode(Outputs([request_delta(r) for r in requests], None)))
        assert isinstance(msg, Outputs)
        for request, delta in zip(requests, msg.requests):
            got = accumulators[delta.request_id].add(delta)
            assert got == tiny_llm.output_processor.request_output(request), (steps, delta)
            if got.finished:
                finished.add(got.request_id)
    assert finished == set(accumulators)
    # the cases happened: a stop string cut the text, best_of picked 2 of 3, logprobs came
    outs = {rid: acc.output for rid, acc in accumulators.items()}
    assert outs["r3"].outputs[0].finish_reason == "stop"
    assert [c.index for c in outs["r2"].outputs] == [0, 1]
    assert len(outs["r1"].outputs[0].logprobs) == len(outs["r1"].outputs[0].token_ids)
    # prompt logprobs (once per request, with decoded tokens unless detokenize=False, which
    # leaves the text empty)
    for rid in ("r5", "r6"):
        plp, ids = outs[rid].prompt_logprobs, outs[rid].prompt_token_ids
        assert len(plp) == len(ids) and plp[0] is None
        assert all(ids[j] in plp[j] for j in range(1, len(ids)))
    no_text = outs["r5"].outputs[0]
    assert no_text.text == "" and len(no_text.token_ids) == 4
    assert all(lp.decoded_token is None for e in outs["r5"].prompt_logprobs[1:] + no_text.logprobs
               for lp in e.values())
    assert outs["r6"].prompt_logprobs[1][outs["r6"].prompt_token_ids[1]].decoded_token
    assert all(lp.decoded_token is not None for c in outs["r6"].outputs for e in c.logprobs
               for lp in e.values())


def test_requests_and_errors_cross_the_boundary():
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToCore)
    params = SamplingParams(temperature=0.5, stop=["x"], stop_token_ids=[3], logprobs=1, seed=4)
    msg = decoder.decode(encoder.encode(AddRequest("a", None, [1, 2], params_to_dict(params))))
    assert SamplingParams(**msg.params) == params
    from_core = msgspec.msgpack.Decoder(FromCore)
    for error in [ContextLengthExceededError("too long", "max_tokens"),
                  InvalidRequestError("bad n", "n"), EngineStepError("boom")]:
        back = rebuild_error(from_core.decode(encoder.encode(error_message("a", error))))
        assert type(back) is type(error) and str(back) == str(error)
        assert getattr(back, "param", None) == getattr(error, "param", None)
    assert isinstance(rebuild_error(RequestError("a", "ValueError", "no", None)), ValueError)


def test_async_engine_carries_prompt_logprobs(tiny_llm):
    """The in-process engine (`AsyncEngine`, which owns the LLM from here on) streams the
    same prompt logprobs as `LLM.generate`."""
    import asyncio

    from jpaged.engine.async_engine import AsyncEngine
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    want = tiny_llm.generate(["a prompt about the sea"], params, use_tqdm=False)[0].prompt_logprobs
    engine = AsyncEngine(tiny_llm)

    async def run():
        return [out async for out in engine.generate("a prompt about the sea", params)]
    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    assert outs[-1].finished and all(out.prompt_logprobs == want for out in outs)
