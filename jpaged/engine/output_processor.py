"""Output processing: a sampled token -> the sequence's tokens, logprobs, text and finish.

After each step the engine core hands every sequence that sampled its row of the
sampler's output; this appends the token, records its logprob (and the top-k asked
for), extends the text by incremental detokenization (unless the request has
`detokenize=False`: then text stays "" and logprobs carry no decoded tokens), and checks
the stop conditions in vLLM's order: stop token ids, EOS (unless ignored), stop strings
(cut from the text unless `include_stop_str_in_output`), then max_tokens and
max_model_len. Before `min_tokens` no stop condition but the length ones applies. It also
records the prompt logprobs a step computed (`prompt_logprob_rows` says which positions
a step must compute them for). Host only: no jax.
"""
from __future__ import annotations

import functools

from jpaged.core.scheduler_output import SchedulerOutput
from jpaged.core.sequence import Request, Sequence, SequenceStatus
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams

from .detokenizer import detokenize_incrementally


def prompt_logprob_rows(batch: SchedulerOutput) -> list[tuple[Sequence, int, int]]:
    """(sequence, first position, count) of the prompt positions `batch` computes whose
    logprobs (of the next prompt token) its requests still lack: position j predicts token
    j + 1, so the last prompt position (it predicts the first output token) has none, and
    positions computed again after a recompute preemption are not recorded twice."""
    rows = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        recorded = seq.request.prompt_logprobs
        if recorded is None or not n:
            continue
        first = len(recorded) - 1
        end = min(seq.num_computed_tokens + n, seq.num_prompt_tokens - 1)
        if first < end:
            # no prefix-cache hits for these requests: every position is computed, in order
            assert seq.num_computed_tokens <= first
            rows.append((seq, first, end - first))
    return rows


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        # A logprob's decoded_token: the token alone, special tokens kept (as vLLM)
        self.decode_token = functools.lru_cache(maxsize=1 << 16)(
            lambda t: tokenizer.decode([t], skip_special_tokens=False))

    def _entry(self, token: int, logprob: float, rank: int | None, top_ids, top_logprobs,
               detokenize: bool) -> dict[int, Logprob]:
        """A position's logprobs: `token`'s, then the top ones (ranks 1..k; a top token that
        is `token` gets its rank there)."""
        entry = {token: Logprob(logprob, rank)}
        for rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs), 1):
            entry.setdefault(int(tid), Logprob(float(lp)))
            entry[int(tid)].rank = rank
        if detokenize:
            for tid, lp in entry.items():
                lp.decoded_token = self.decode_token(tid)
        return entry

    def append_token(self, seq: Sequence, out, row: int) -> None:
        """Append row `row` of the sampler output `out` to `seq`; finish it if it stops."""
        params = seq.request.params
        token = int(out.token_ids[row])
        seq.token_ids.append(token)
        seq.cumulative_logprob += float(out.logprobs[row])
        if seq.logprobs is not None:
            k = params.logprobs
            seq.logprobs.append(self._entry(
                token, float(out.logprobs[row]), None, out.top_ids[row][:k] if k else (),
                out.top_logprobs[row][:k] if k else (), params.detokenize))
        if params.detokenize:
            seq.text += detokenize_incrementally(self.tokenizer, seq.output_token_ids,
                                                 seq.detok_state, params.skip_special_tokens)
        n_out = seq.num_output_tokens
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                finish(seq, "stop", token)
            elif not params.ignore_eos and token in self.eos_token_ids:
                finish(seq, "stop", None)
            elif params.stop and self._check_stop_strings(seq, params):
                return
        if not seq.finished and ((params.max_tokens is not None and n_out >= params.max_tokens)
                                 or seq.num_tokens >= self.max_model_len):
            finish(seq, "length", None)

    @staticmethod
    def _check_stop_strings(seq: Sequence, params: SamplingParams) -> bool:
        for stop in params.stop:
            # only the newly added text (and what a stop string may straddle) is searched
            at = seq.text.find(stop, max(0, len(seq.text) - len(stop) - 64))
            if at >= 0:
                seq.text = seq.text[:at + len(stop)] if params.include_stop_str_in_output else seq.text[:at]
                finish(seq, "stop", stop)
                return True
        return False

    def append_prompt_logprobs(self, rows: list[tuple[Sequence, int, int]], out) -> None:
        """Record a step's prompt logprobs (`PromptLogprobs`, one row per position of `rows`,
        in order) on the requests."""
        i = 0
        for seq, first, count in rows:
            request = seq.request
            assert len(request.prompt_logprobs) == first + 1
            k = request.params.prompt_logprobs
            for j in range(i, i + count):
                token = seq.token_ids[first + 1 + j - i]
                request.prompt_logprobs.append(self._entry(
                    token, float(out.token_logprobs[j]), int(out.token_ranks[j]), out.top_ids[j][:k],
                    out.top_logprobs[j][:k], request.params.detokenize))
            i += count

    @staticmethod
    def request_output(request: Request) -> RequestOutput:
        """The request's outputs so far; a finished `best_of > n` request keeps its n
        samples with the highest cumulative logprob."""
        seqs = request.seqs
        if request.finished and request.params.best_of > request.params.n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:request.params.n]
        outs = [CompletionOutput(i if len(seqs) < len(request.seqs) else s.index, s.text,
                                 list(s.output_token_ids), s.cumulative_logprob,
                                 s.logprobs, s.finish_reason, s.stop_reason)
                for i, s in enumerate(seqs)]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             request.finished, request.prompt_logprobs)


def finish(seq: Sequence, reason: str, stop_reason=None) -> None:
    """Mark `seq` finished ("stop", "length" or "abort"); its blocks are freed by the engine."""
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
    seq.stop_reason = stop_reason
