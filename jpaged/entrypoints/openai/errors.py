"""jpaged's exceptions as OpenAI error responses: `{"error": {"message", "type", "param",
"code"}}` with the HTTP status each exception type stands for. The mapping reads types and
the exceptions' own fields (`param`, `code`), never message text."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from jpaged.exceptions import (AuthenticationError, EngineDeadError, EngineNotReadyError,
                               EngineStateError, EngineStepError, InvalidRequestError, ModelNotFoundError,
                               RequestTooLargeError, ServerOverloadedError)

# (exception type, HTTP status, OpenAI error type, default code); the first match wins.
ERROR_STATUS = [
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (AuthenticationError, 401, "invalid_request_error", "invalid_api_key"),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (EngineDeadError, 503, "server_error", "engine_dead"),
    (EngineNotReadyError, 503, "server_error", "engine_warming_up"),
    (ServerOverloadedError, 503, "server_error", "server_overloaded"),
    (EngineStepError, 500, "server_error", None),
    (EngineStateError, 409, "invalid_request_error", "engine_state"),
]


def shorten(text: str, limit: int = 100) -> str:
    """Client text as an error quotes it: at most `limit` characters (a 1 MiB model name is
    not echoed back whole)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def error_body(status: int, message: str, type: str, param: str | None = None,
               code: str | int | None = None) -> JSONResponse:
    # A message may quote the client's text: one that is not Unicode (a lone surrogate)
    # must not make the error itself unencodable.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


def classify(exc: BaseException) -> tuple[int, str, str | None, str | int | None]:
    """(status, type, param, code) of an exception; anything unexpected is a 500."""
    for cls, status, kind, code in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, kind, getattr(exc, "param", None), getattr(exc, "code", None) or code
    return 500, "server_error", None, None


def error_response(exc: BaseException) -> JSONResponse:
    status, kind, param, code = classify(exc)
    message = str(exc) if status != 500 or isinstance(exc, EngineStepError) else f"internal error: {exc!r}"
    response = error_body(status, message, kind, param, code)
    if isinstance(exc, ServerOverloadedError):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response
