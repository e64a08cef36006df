"""Input processing: a prompt in any accepted form -> checked token ids.

Text is tokenized, token ids are checked against the vocabulary and the prompt against
`max_model_len`, and chat messages go through the model's chat template. `LLM`, the CLI
and the OpenAI server all use this, so a bad prompt gets the same error (an
`InvalidRequestError` naming the field) wherever it comes from. Host only: no jax.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jpaged.exceptions import (ContextLengthExceededError, InvalidRequestError,
                               InvalidRequestTypeError)

PromptType = str | dict[str, Any] | list[int]


@dataclasses.dataclass(frozen=True)
class ProcessedPrompt:
    """A checked prompt: its text (None when given as token ids) and its token ids."""
    text: str | None
    token_ids: list[int]


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def process(self, prompt: PromptType | ProcessedPrompt, param: str = "prompt") -> ProcessedPrompt:
        """A string, a list of token ids, or a dict with 'prompt_token_ids' (and optionally
        'prompt', its text) or 'prompt' -> a ProcessedPrompt that fits max_model_len with
        room for one output token."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt:
            return self.process(prompt["prompt"], param)
        elif isinstance(prompt, (list, tuple)):
            text, ids = None, prompt
        else:
            raise InvalidRequestTypeError(
                f"a prompt must be a string, a list of token ids or a dict with "
                f"'prompt_token_ids', got {type(prompt).__name__}", param)
        ids = self.check_token_ids(ids, param)
        self.check_prompt_length(len(ids), param)
        return ProcessedPrompt(text, ids)

    def check_token_ids(self, ids, param: str = "prompt") -> list[int]:
        """Non-empty, integers, inside the vocabulary."""
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise InvalidRequestTypeError(f"{param} must be a list of integer token ids", param) from None
        if not ids:
            raise InvalidRequestError(f"{param} is empty: it must have at least one token", param)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"{param} has token ids outside the vocabulary "
                                      f"[0, {self.vocab_size}): {bad[:5]}", param)
        return ids

    def check_prompt_length(self, num_tokens: int, param: str = "prompt") -> None:
        if num_tokens >= self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length (max_model_len) is {self.max_model_len} "
                f"tokens; the prompt has {num_tokens}, which leaves no room for output", param)

    def check_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Prompt + max_tokens must fit max_model_len."""
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length (max_model_len) is {self.max_model_len} "
                f"tokens. However, you requested {num_prompt_tokens + max_tokens} tokens "
                f"({num_prompt_tokens} in the prompt, {max_tokens} in the completion)", "max_tokens")

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    chat_template: str | None = None, param: str = "messages") -> list[int]:
        """Token ids of one conversation through the model's chat template (or `chat_template`),
        checked like any prompt."""
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=True, return_dict=False)
        except Exception as e:  # noqa: BLE001 - a template refusing the chat is bad input
            raise InvalidRequestError(f"the chat template refused the messages: {e}", param) from None
        return self.check_token_ids(list(ids), param)
