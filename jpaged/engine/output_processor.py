"""Output processing: a sampled token -> the sequence's tokens, logprobs, text and finish.

After each step the engine core hands every sequence that sampled its row of the
sampler's output; this appends the token, records its logprob (and the top-k asked
for), extends the text by incremental detokenization, and checks the stop conditions
in vLLM's order: stop token ids, EOS (unless ignored), stop strings (cut from the text
unless `include_stop_str_in_output`), then max_tokens and max_model_len. Before
`min_tokens` no stop condition but the length ones applies. Host only: no jax.
"""
from __future__ import annotations

from jpaged.core.sequence import Request, Sequence, SequenceStatus
from jpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jpaged.sampling_params import SamplingParams

from .detokenizer import detokenize_incrementally


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, out, row: int) -> None:
        """Append row `row` of the sampler output `out` to `seq`; finish it if it stops."""
        params = seq.request.params
        token = int(out.token_ids[row])
        seq.token_ids.append(token)
        seq.cumulative_logprob += float(out.logprobs[row])
        if seq.logprobs is not None:
            entry = {token: Logprob(float(out.logprobs[row]))}
            top = zip(out.top_ids[row][:params.logprobs], out.top_logprobs[row][:params.logprobs]) \
                if params.logprobs else ()
            for rank, (tid, lp) in enumerate(top, 1):
                entry.setdefault(int(tid), Logprob(float(lp)))
                entry[int(tid)].rank = rank
            seq.logprobs.append(entry)
        seq.text += detokenize_incrementally(self.tokenizer, seq.output_token_ids, seq.detok_state,
                                             params.skip_special_tokens)
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
                             request.finished)


def finish(seq: Sequence, reason: str, stop_reason=None) -> None:
    """Mark `seq` finished ("stop", "length" or "abort"); its blocks are freed by the engine."""
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
    seq.stop_reason = stop_reason
