"""`jpaged.LLM`: the batch API (vLLM's shape) on the engine core.

`LLM` is the engine core itself (as nano-vllm's `LLM` is its engine) plus the calls that
run requests to completion: `generate`, `chat` and `beam_search`. Streaming callers use
the core's `add_request` / `step` / `abort_request` directly.
"""
from __future__ import annotations

from typing import Sequence as Seq

from tqdm.auto import tqdm

from jpaged.engine.beam_search import run_beam_search
from jpaged.engine.engine_core import EngineCore
from jpaged.engine.input_processor import PromptType
from jpaged.exceptions import EngineStateError, InvalidRequestError
from jpaged.outputs import BeamSearchOutput, RequestOutput
from jpaged.sampling_params import BeamSearchParams, SamplingParams


class LLM(EngineCore):
    """The engine. `model`: None (the embedded SmolLM2-135M-Instruct), a path to a Hugging
    Face folder or a .gguf file, or an in-memory Flax model (then pass `params=` and
    `tokenizer=`). Other keyword arguments: `EngineConfig` fields.

    Between calls a research pipeline may swap the weights (`get_weights`,
    `update_weights`), free the memory while it trains (`sleep`, `wake_up`) and, with
    requests left in flight by `add_request`, `pause` / `resume` (EngineCore's)."""

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order. Without
        `sampling_params`, `default_sampling_params()` (the model's generation config)."""
        self._check_can_generate()
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or self.default_sampling_params()] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise InvalidRequestError(f"got {len(sampling_params)} sampling params for "
                                      f"{len(prompts)} prompts")
        processed = [self.input_processor.process(p) for p in prompts]  # all checked first
        ids = []
        try:
            for prompt, params in zip(processed, sampling_params):
                ids.append(self.add_request(prompt, params))
        except BaseException:
            for request_id in ids:
                self.abort_request(request_id)
            raise
        return self._run_to_completion(ids, use_tqdm)

    def _check_can_generate(self) -> None:
        if self.sleep_level:
            raise EngineStateError("the engine is asleep: call wake_up() first")
        if self.paused or self._pausing:
            raise EngineStateError("the engine is paused: call resume() first")

    def pause(self, mode: str = "wait") -> list[RequestOutput]:
        """Pause generation (`EngineCore.pause_requests`'s modes); with mode "wait" it runs
        the requests in flight to the end here. Returns the final outputs of the requests
        it aborted or finished."""
        done = {r.request_id: self.output_processor.request_output(r)
                for r in self.pause_requests(mode)}
        while self._pausing:
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return list(done.values())

    def _run_to_completion(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req")
        try:
            while len(results) < len(ids):
                for out in self.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for request_id in ids:  # leave no half-finished request holding blocks
                self.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True):
        """`messages`: one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.input_processor.render_chat(
            conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template)}
            for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def beam_search(self, prompts, params: BeamSearchParams | Seq[BeamSearchParams]
                    ) -> list[BeamSearchOutput]:
        """Beam search (vLLM's shape): one `BeamSearchOutput` per prompt whose `sequences`
        are the beams, best first. See `jpaged.engine.beam_search`."""
        self._check_can_generate()
        return run_beam_search(self, prompts, params)
