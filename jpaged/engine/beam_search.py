"""Beam search inside the engine: `LLM.beam_search(prompts, BeamSearchParams(...))`
(docs/design.md, "Copy-on-write and beam search").

The API is shaped like vLLM's (`BeamSearchParams`, one `BeamSearchOutput` per prompt
whose `sequences` are the beams, best first, each with `tokens` (prompt + generated),
`text` (generated), `cum_logprob`). Beams are engine sequences that run in the same
continuously batched steps as other requests. Every step each beam's step returns the
top-K token logprobs of its raw next-token distribution (the sampler's logprobs); once
all beams of a request have theirs, the request picks its next beams. A beam that
continues in several ways is forked (the children share all its blocks, its partly
filled last block is copied on the first write); a beam with no continuation is freed,
which releases exactly the blocks nobody else holds.

Selection follows transformers' `generate(num_beams=W, do_sample=False)` step for step
(transformers 4.5x / 5.x `_beam_search`), so the best beam matches it:
- candidates are the top (1 + #EOS ids) * W of all beams' cumulative logprob + next-token
  logprob; in that order, a candidate ending in EOS whose rank is < W becomes a finished
  hypothesis, and the first W candidates that do not end become the next beams;
- a finished hypothesis scores cum_logprob / generated_len ** length_penalty, where
  generated_len counts the generated tokens including the EOS (not the prompt); the
  W best hypotheses are kept;
- at max_tokens every top-W candidate is a hypothesis; earlier, the search stops when
  W hypotheses exist and `early_stopping` says so: True stops at once, False (HF's
  default) when the best running beam's cum_logprob / generated_len ** length_penalty
  cannot beat the worst hypothesis, "never" uses max_tokens as that length when
  length_penalty > 0.
Only the per-beam top W + #EOS tokens are needed to reproduce this exactly, so widths up
to max_logprobs - #EOS work (19 with the default max_logprobs=20 and one EOS id); wider
beams need a larger `max_logprobs`. With `ignore_eos=True`, EOS is an ordinary token.

Where vLLM's own `LLM.beam_search` differs (it keeps every EOS among each beam's top 2W
as finished, runs to max_tokens, and divides by the prompt + output length), this
module follows transformers.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from jpaged.core.sequence import Request, Sequence, SequenceStatus
from jpaged.exceptions import InvalidRequestError, InvalidRequestTypeError
from jpaged.outputs import BeamSearchOutput, BeamSearchSequence, Logprob
from jpaged.sampling_params import BeamSearchParams, SamplingParams


def beam_sampling_params(params: BeamSearchParams, eos_token_ids,
                         max_num_seqs: int, max_logprobs: int) -> SamplingParams:
    """The SamplingParams a beam-search request runs with: greedy steps that return the top
    W + #EOS logprobs of each beam. Raises if the beams cannot run together."""
    if not isinstance(params, BeamSearchParams):
        raise InvalidRequestTypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
    if params.beam_width > max_num_seqs:  # the beams of a request run together
        raise InvalidRequestError(f"beam_width={params.beam_width} exceeds max_num_seqs={max_num_seqs}",
                                  "beam_width")
    eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
    k = params.beam_width + len(eos)
    if k > max_logprobs:
        raise InvalidRequestError(
            f"beam_width={params.beam_width} needs the top {k} logprobs of every beam (width + "
            f"{len(eos)} EOS ids); raise max_logprobs (now {max_logprobs}) to at least {k}",
            "beam_width")
    return SamplingParams(temperature=0.0, max_tokens=None, logprobs=k, ignore_eos=True)


class BeamGroup:
    """The beam state of one request; its live beams are `request.seqs`."""

    def __init__(self, request: Request, params: BeamSearchParams, eos_token_ids, max_model_len: int):
        self.request = request
        self.params = params
        self.width = params.beam_width
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.num_candidates = self.width + len(self.eos)  # per beam; see the module docstring
        self.keep = max(2, 1 + len(self.eos)) * self.width
        self.max_model_len = max_model_len
        self.finished: list[BeamSearchSequence] = []
        self.received: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.done = False

    def receive(self, seq: Sequence, out, row: int) -> None:
        """Record a beam's next-token candidates from a step's sampler output."""
        k = self.num_candidates
        self.received[seq.seq_id] = (np.asarray(out.top_ids[row][:k]),
                                     np.asarray(out.top_logprobs[row][:k], np.float32))

    def ready(self) -> bool:
        return bool(self.request.seqs) and all(
            s.seq_id in self.received and s.status is SequenceStatus.RUNNING
            and s.num_computed_tokens == s.num_tokens for s in self.request.seqs)

    def _finish_hypothesis(self, beam: Sequence, token: int, lp: float, cum, gen_len: int,
                           reason: str) -> None:
        hyp = BeamSearchSequence(beam.token_ids + [token], beam.logprobs + [{token: Logprob(lp, 1)}],
                                 float(cum), None, reason,
                                 float(cum / np.float32(gen_len ** self.params.length_penalty)),
                                 beam.num_prompt_tokens)
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width:]

    def advance(self, engine) -> int:
        """If every beam has its candidates: pick the next beams (fork / free) or finish.
        Uses the engine core's `fork_sequence` and `free_sequence`; returns the number of
        tokens the beams gained."""
        if self.done or not self.ready():
            return 0
        W, p = self.width, self.params
        beams = list(self.request.seqs)
        gen_len = beams[0].num_output_tokens + 1
        last = gen_len >= p.max_tokens or beams[0].num_tokens + 1 >= self.max_model_len
        cands = []
        for bi, beam in enumerate(beams):
            ids, lps = self.received[beam.seq_id]
            cum = np.float32(beam.cumulative_logprob)
            cands += [(cum + lps[j], bi, j, int(ids[j]), float(lps[j])) for j in range(len(ids))]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        blocked = p.early_stopping is True and len(self.finished) >= W
        chosen = []
        for rank, (score, bi, _, token, lp) in enumerate(cands[:self.keep]):
            if last or token in self.eos:
                if rank < W and not blocked:
                    self._finish_hypothesis(beams[bi], token, lp, score, gen_len,
                                            "stop" if token in self.eos else "length")
            elif len(chosen) < W:
                chosen.append((bi, token, lp, score))
        if not last and len(self.finished) >= W:
            if p.early_stopping is True:
                last = True
            else:
                length = p.max_tokens if (p.early_stopping == "never" and p.length_penalty > 0) else gen_len
                best = chosen[0][3] / np.float32(length ** p.length_penalty)
                last = not best > self.finished[-1].score
        self.received.clear()
        if last:
            self._finish(engine)
            return 0
        kids = defaultdict(list)
        for bi, token, lp, score in chosen:
            kids[bi].append((token, lp, score))
        plans = []
        for bi, beam in enumerate(beams):  # forks first: a child copies its parent's state
            for token, lp, score in kids.get(bi, [])[1:]:
                child = Sequence(self.request, list(beam.token_ids), beam.num_prompt_tokens)
                child.logprobs = list(beam.logprobs)
                engine.fork_sequence(beam, child)
                plans.append((child, token, lp, score))
            if bi in kids:
                plans.append((beam, *kids[bi][0]))
        for bi, beam in enumerate(beams):
            if bi not in kids:  # dropped: frees what only this beam held
                engine.free_sequence(beam)
        plans.sort(key=lambda x: -x[3])
        for seq, token, lp, score in plans:
            seq.token_ids.append(token)
            seq.cumulative_logprob = float(score)
            seq.logprobs.append({token: Logprob(lp, 1)})
        self.request.seqs = [seq for seq, *_ in plans]
        return len(plans)

    def _finish(self, engine) -> None:
        for beam in self.request.seqs:
            engine.free_sequence(beam)
        self.request.seqs = []
        self.done = True

    def output(self, tokenizer) -> BeamSearchOutput:
        for hyp in self.finished:
            out = hyp.output_token_ids
            if out and out[-1] in self.eos:
                out = out[:-1]
            hyp.text = tokenizer.decode(out, skip_special_tokens=True)
        return BeamSearchOutput(list(self.finished))


def run_beam_search(engine, prompts: Any, params) -> list[BeamSearchOutput]:
    """`LLM.beam_search`: one BeamSearchOutput per prompt, in order. `params`: one
    BeamSearchParams for all prompts or one per prompt. Every prompt and parameter set is
    checked before any request is queued."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                            and isinstance(prompts[0], int)):
        prompts = [prompts]
    prompts = list(prompts)
    params = [params] * len(prompts) if isinstance(params, BeamSearchParams) else list(params)
    if len(params) != len(prompts):
        raise InvalidRequestError(f"got {len(params)} beam search params for {len(prompts)} prompts")
    for p in params:
        beam_sampling_params(p, engine.eos_token_ids, engine.config.max_num_seqs,
                             engine.config.max_logprobs)
    processed = [engine.input_processor.process(p) for p in prompts]
    ids: list[str] = []
    try:
        for prompt, p in zip(processed, params):
            ids.append(engine.add_request(prompt, beam_params=p))
        groups = [engine.requests[i].beam for i in ids]
        while not all(g.done for g in groups):
            engine.step()
    except BaseException:
        for request_id in ids:
            engine.abort_request(request_id)
        raise
    return [g.output(engine.tokenizer) for g in groups]
