"""Request and response schemas of the OpenAI-compatible server (pydantic).

Shaped like OpenAI's API, with vLLM's extra sampling fields (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `prompt_logprobs`, ...). Unknown fields are
ignored, as the OpenAI client may send newer ones. Requests are strict, as
OpenAI's API is: a field of the wrong JSON type is a 400 naming it (`"2"` is
not an integer, `2.0` not an integer, `"yes"` not a boolean), an integer is
still a number and `null` still means the default of an optional field. Their
text must be Unicode: a lone UTF-16 surrogate (JSON `"\ud800"`) is refused by
name, never handed to the tokenizer. FastAPI publishes these as the server's
OpenAPI schema, which the fuzz tests generate requests from.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _limit(name: str) -> dict:
    """Marks a field whose upper bound depends on the server (the model, its limits): the
    server writes it into its OpenAPI schema as `maximum` (see api_server._finish_schema)."""
    return {"x-jpaged-limit": name}


TokenId = Annotated[int, Field(ge=0, json_schema_extra=_limit("token_id"))]


def _unicode(text: str) -> str:
    """Text that encodes as UTF-8: JSON can carry lone surrogates (`"\\ud800"`), which no
    tokenizer takes and no response can echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains {text[e.start]!r} at character {e.start}, a lone UTF-16 "
                         "surrogate, which is not Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())


class _Request(_Model):
    """A request body: strict types (see the module's doc)."""
    model_config = ConfigDict(strict=True)


# ---- errors ----------------------------------------------------------------------------------


class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Model):
    error: ErrorInfo


# ---- shared ----------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False


class UsageInfo(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Sampling(_Request):
    """Sampling fields shared by completions and chat completions."""
    model: Text | None = Field(None, description="the served model name; omitted = the only one")
    n: int = Field(1, ge=1, description="completions per prompt", json_schema_extra=_limit("n"))
    best_of: int | None = Field(None, ge=1, json_schema_extra=_limit("n"))
    temperature: float | None = Field(None, ge=0, description="0 = greedy [default 1]")
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, description="not supported: must be empty")
    user: Text | None = None
    # vLLM's extra sampling fields
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 = disabled")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = Field(
        None, ge=0, description="each prompt token's log-probability and this many top tokens at "
                                "its position (not with stream)", json_schema_extra=_limit("logprobs"))


# ---- completions -----------------------------------------------------------------------------


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text], list[TokenId], list[list[TokenId]]] = Field(
        ..., description="a string, a list of strings, token ids, or a list of token id lists")
    max_tokens: int | None = Field(16, ge=1, description="null = up to max_model_len",
                                   json_schema_extra=_limit("max_tokens"))
    logprobs: int | None = Field(None, ge=0, description="top log-probabilities per token",
                                 json_schema_extra=_limit("logprobs"))
    echo: bool = False
    suffix: Text | None = Field(None, description="not supported: must be empty")


class PromptLogprob(_Model):
    """vLLM's `Logprob`: one token's entry at one prompt position."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: None for the first prompt token, then {token id: PromptLogprob}
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionLogprobs(_Model):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, per choice (its prompt's)


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- chat completions ------------------------------------------------------------------------


class ContentPart(_Request):
    type: Text
    text: Text | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="null = up to max_model_len",
                                   json_schema_extra=_limit("max_tokens"))
    max_completion_tokens: int | None = Field(None, ge=1, description="overrides max_tokens",
                                              json_schema_extra=_limit("max_tokens"))
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, json_schema_extra=_limit("logprobs"))
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported: must be empty")
    tool_choice: Text | dict[str, Any] | None = None
    add_generation_prompt: bool = True


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Model):
    content: list[TokenLogprob] | None = None


class ChatResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's


# ---- models, tokenize ------------------------------------------------------------------------


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jpaged"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Request):
    model: Text | None = None
    prompt: Text | None = Field(None, description="text to tokenize (or give messages)")
    messages: list[ChatMessage] | None = Field(None, description="a chat, through its template")
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(_Model):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Request):
    model: Text | None = None
    tokens: list[TokenId]


class DetokenizeResponse(_Model):
    prompt: str
