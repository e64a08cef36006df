"""The server's own settings (beside the engine's `EngineConfig`): one dataclass whose
field metadata makes the `jpaged serve` flags, as the engine's does."""
from __future__ import annotations

import dataclasses

from jpaged.config import config_field

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclasses.dataclass
class ServerConfig:
    host: str = config_field("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = config_field(8000, "port to listen on; 0 picks a free one")
    served_model_name: list[str] | None = config_field(
        None, "model name(s) clients use; the first is reported [default: the model file's stem, "
              f"{DEFAULT_MODEL_NAME} for the default model]")
    api_key: str | None = config_field(
        None, "require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
              "[default: $JPAGED_API_KEY, or none]")
    protect_metrics_and_docs: bool = config_field(
        False, "with an API key, require it on /metrics, /docs, /redoc and /openapi.json too "
               "(by default they stay open, as vLLM leaves /metrics; /health and /ready always do)")
    enable_control_endpoints: bool = config_field(
        False, "serve the research-pipeline endpoints /pause, /resume, /is_paused, /sleep, "
               "/wake_up and /is_sleeping (any client reaching them can stop generation: turn "
               "them on for a trusted network or with an API key, as vLLM keeps them for its "
               "dev mode)")
    # ---- what one request may ask for, and how many may wait (fairness) ----
    max_n: int = config_field(16, "largest n / best_of a request may ask for")
    max_request_bytes: int = config_field(4 << 20, "largest request body; takes units (4MiB) "
                                                   "[default: 4MiB]", unit="bytes")
    max_prompts_per_request: int = config_field(256, "most prompts in one completion request")
    max_sequences_per_request: int = config_field(
        1024, "most sequences one request may start: prompts x max(n, best_of)")
    max_tokens_per_request: int = config_field(
        1 << 20, "most tokens one request may ask for: each prompt's tokens plus max_tokens "
                 "(or what is left of max_model_len) for each of its sequences")
    max_stop_sequences: int = config_field(64, "longest stop list (and stop_token_ids) of a request")
    max_waiting_requests: int = config_field(
        4096, "most prompts waiting for their first token (queued, or being tokenized); a "
              "request that would pass it is answered 503 with Retry-After")
    # ---- connections (jpaged's HTTP/1.1 protocol over uvicorn's: http_protocol.py) ----
    max_connections: int = config_field(
        2048, "most open connections; one more is answered 503 and closed (raises the "
              "process's open-file limit to fit when it can)")
    timeout_keep_alive: float = config_field(
        5.0, "seconds a connection may idle between requests (or before its first) before it "
             "is closed")
    header_timeout: float = config_field(
        10.0, "seconds a request's headers may take from its first byte (in all, not per read: a "
              "client trickling bytes is cut off); then 408 and close")
    body_timeout: float = config_field(
        30.0, "seconds a request's body may take after its headers (in all); then the "
              "connection is closed")
    warmup: bool = config_field(True, "compile every executable a request can need (each step "
                                      "bucket, every sampler mode) before /ready answers 200; "
                                      "a restart loads them from disk")
    engine_process: bool = config_field(
        True, "run the engine core in a process of its own, so HTTP, tokenization and SSE never "
              "wait on the engine's GIL (an in-memory model, or an LLM handed to the server, "
              "runs in the server's process)")
    log_level: str = config_field("info", "uvicorn's and jpaged's log level", choices=LOG_LEVELS)
    shutdown_timeout: float = config_field(
        30.0, "seconds SIGTERM or Ctrl-C waits for requests in flight to finish (no new "
              "connection is accepted meanwhile) before aborting what is left")

    def __post_init__(self):
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        if self.served_model_name is not None and not self.served_model_name:
            raise ValueError("served_model_name must name at least one model")
        for name in ("max_n", "max_request_bytes", "max_prompts_per_request", "max_sequences_per_request",
                     "max_tokens_per_request", "max_stop_sequences", "max_waiting_requests",
                     "max_connections"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_prompts_per_request > self.max_waiting_requests:
            raise ValueError(f"max_prompts_per_request ({self.max_prompts_per_request}) must not exceed "
                             f"max_waiting_requests ({self.max_waiting_requests}): such a request "
                             "could never be queued")
        for name in ("shutdown_timeout", "timeout_keep_alive", "header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or \
                    (value == 0 and name != "shutdown_timeout"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
