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
    max_n: int = config_field(16, "largest n / best_of a request may ask for")
    max_request_bytes: int = config_field(4 << 20, "largest request body; takes units (4MiB) "
                                                   "[default: 4MiB]", unit="bytes")
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
        for name in ("max_n", "max_request_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.shutdown_timeout, (int, float)) or self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
