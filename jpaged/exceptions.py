"""Every error jpaged raises on purpose, in one place (docs/design.md, "Errors").

Callers branch on these types, never on message text: the OpenAI server maps
each type to its HTTP status and error body (`entrypoints/openai/errors.py`).
Errors the API promises as `ValueError` or `TypeError` stay subclasses of them.
"""
from __future__ import annotations


class JpagedError(Exception):
    """Base of jpaged's own errors."""


# ---- a request the engine will not take (HTTP 4xx) ----------------------------------------------

class InvalidRequestError(JpagedError, ValueError):
    """Bad input in one request; `param` names the field it concerns (an OpenAI error's
    `param`), `code` a machine-readable reason. The engine goes on serving."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequestTypeError(InvalidRequestError, TypeError):
    """A request field of the wrong type (a prompt that is neither text nor token ids, ...)."""


class ContextLengthExceededError(InvalidRequestError):
    """The prompt, or prompt + max_tokens, does not fit `max_model_len`."""

    def __init__(self, message: str, param: str | None = "prompt"):
        super().__init__(message, param, "context_length_exceeded")


class ModelNotFoundError(InvalidRequestError):
    """A request named a model this server does not serve."""

    def __init__(self, message: str):
        super().__init__(message, "model", "model_not_found")


class AuthenticationError(JpagedError):
    """Missing or wrong API key."""


class RequestTooLargeError(JpagedError):
    """A request body over the server's size limit."""


# ---- the engine cannot serve (HTTP 5xx) --------------------------------------------------------

class EngineDeadError(JpagedError, RuntimeError):
    """The engine thread has stopped: no request can be served."""


class DistributedError(JpagedError, RuntimeError):
    """A process of a model split over several processes (jax.distributed) is gone, or the
    processes disagree on their engine arguments: the engine cannot go on."""


class EngineNotReadyError(JpagedError, RuntimeError):
    """The engine is alive but still warming up (compiling its executables)."""


class ServerOverloadedError(JpagedError, RuntimeError):
    """The server's queue is full: the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStepError(JpagedError, RuntimeError):
    """A step raised: the requests it held were aborted (the engine goes on)."""


class BeamSearchDoesNotFitError(JpagedError, RuntimeError):
    """A beam-search request's beams cannot all fit in the KV pool at once."""


# ---- configuration and the machine ------------------------------------------------------------

class KVCacheTooSmallError(JpagedError, ValueError):
    """`kv_cache_memory` cannot hold one request of `max_model_len` tokens, or is more than
    the machine has."""


class KernelBuildError(JpagedError, RuntimeError):
    """The C++ CPU attention kernel could not be built or loaded."""


class DevicelessUnavailableError(JpagedError, RuntimeError):
    """Deviceless GPU compilation cannot run here (the message says why)."""


class EngineStateError(JpagedError, RuntimeError):
    """A call the engine cannot take in its state now (paused, asleep, in flight, no
    weights): the message says what to call first. Nothing was changed."""
