"""Beam search inside the engine: `LLM.beam_search(prompts, BeamSearchParams(...))`.

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

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np

from .outputs import Logprob
from .sampling_params import SamplingParams
from .sequence import Request, Sequence, SequenceStatus


@dataclasses.dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # transformers' semantics: True, False or "never"

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"BeamSearchParams.beam_width must be an integer >= 1, got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"BeamSearchParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError("BeamSearchParams.early_stopping must be True, False or 'never', "
                             f"got {self.early_stopping!r}")


@dataclasses.dataclass
class BeamSearchSequence:
    tokens: list[int]  # prompt + generated, as vLLM
    logprobs: list[dict[int, Logprob]]  # one entry per generated token
    cum_logprob: float = 0.0
    text: str | None = None  # the generated text (without a final EOS)
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    score: float = 0.0  # cum_logprob / generated_len ** length_penalty
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


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

    def advance(self, llm) -> None:
        """If every beam has its candidates: pick the next beams (fork / free) or finish."""
        if self.done or not self.ready():
            return
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
            self._finish(llm)
            return
        kids = defaultdict(list)
        for bi, token, lp, score in chosen:
            kids[bi].append((token, lp, score))
        plans = []
        for bi, beam in enumerate(beams):  # forks first: a child copies its parent's state
            for token, lp, score in kids.get(bi, [])[1:]:
                child = Sequence(self.request, list(beam.token_ids), beam.num_prompt_tokens)
                child.logprobs = list(beam.logprobs)
                llm.scheduler.fork(beam, child)
                plans.append((child, token, lp, score))
            if bi in kids:
                plans.append((beam, *kids[bi][0]))
        for bi, beam in enumerate(beams):
            if bi not in kids:  # dropped: frees what only this beam held
                beam.status = SequenceStatus.FINISHED
                llm.scheduler.remove(beam)
        plans.sort(key=lambda x: -x[3])
        for seq, token, lp, score in plans:
            seq.token_ids.append(token)
            seq.cumulative_logprob = float(score)
            seq.logprobs.append({token: Logprob(lp, 1)})
        llm.stats["output_tokens"] += len(plans)
        self.request.seqs = [seq for seq, *_ in plans]

    def _finish(self, llm) -> None:
        for beam in self.request.seqs:
            beam.status = SequenceStatus.FINISHED
            llm.scheduler.remove(beam)
        self.request.seqs = []
        self.done = True
        llm.requests.pop(self.request.request_id, None)

    def output(self, tokenizer) -> BeamSearchOutput:
        for hyp in self.finished:
            out = hyp.output_token_ids
            if out and out[-1] in self.eos:
                out = out[:-1]
            hyp.text = tokenizer.decode(out, skip_special_tokens=True)
        return BeamSearchOutput(list(self.finished))


def beam_search(llm, prompts: Any, params) -> list[BeamSearchOutput]:
    """`LLM.beam_search`: one BeamSearchOutput per prompt, in order. `params`: one
    BeamSearchParams for all prompts or one per prompt."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                            and isinstance(prompts[0], int)):
        prompts = [prompts]
    prompts = list(prompts)
    params = [params] * len(prompts) if isinstance(params, BeamSearchParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} beam search params for {len(prompts)} prompts")
    for p in params:
        if not isinstance(p, BeamSearchParams):
            raise TypeError(f"params must be BeamSearchParams, got {type(p).__name__}")
        if p.beam_width > llm.config.max_num_seqs:  # the beams of a request run together
            raise ValueError(f"beam_width={p.beam_width} exceeds max_num_seqs={llm.config.max_num_seqs}")
        eos = frozenset() if p.ignore_eos else frozenset(llm.eos_token_ids)
        k = p.beam_width + len(eos)
        if k > llm.config.max_logprobs:
            raise ValueError(f"beam_width={p.beam_width} needs the top {k} logprobs of every beam "
                             f"(width + {len(eos)} EOS ids); raise max_logprobs (now "
                             f"{llm.config.max_logprobs}) to at least {k}")
    tokenized = [llm._tokenize(p) for p in prompts]  # every prompt checked before any is queued
    groups: list[BeamGroup] = []
    try:
        for (text, ids), p in zip(tokenized, params):
            eos = frozenset() if p.ignore_eos else frozenset(llm.eos_token_ids)
            sp = SamplingParams(temperature=0.0, max_tokens=None, logprobs=p.beam_width + len(eos),
                                ignore_eos=True)
            request = llm.requests[llm._add_tokenized(text, ids, sp)]
            request.beam = BeamGroup(request, p, eos, llm.max_model_len)
            groups.append(request.beam)
        while not all(g.done for g in groups):
            llm.step()
    except BaseException:
        for g in groups:
            llm.abort_request(g.request.request_id)
        raise
    return [g.output(llm.tokenizer) for g in groups]
