"""ASGI middleware in front of the routes: the API key on protected paths and the request
body size limit (by Content-Length, and by reading a body without one, up to the limit,
before the app sees it).

With an API key, /v1, /tokenize, /detokenize and the RL endpoints (/pause, /resume,
/sleep, /wake_up, /is_paused, /is_sleeping) need it; /metrics and the OpenAPI
documents (/docs, /redoc, /openapi.json) stay open unless `protect_all`, as vLLM leaves
/metrics open for scrapers; the probes /health and /ready are always open."""
from __future__ import annotations

import hmac
from typing import Callable

from jpaged.exceptions import AuthenticationError, RequestTooLargeError

from .errors import classify, error_response

PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/pause", "/resume", "/is_paused", "/sleep",
             "/wake_up", "/is_sleeping")
ALWAYS_OPEN = ("/health", "/ready")  # liveness and readiness probes carry no key


def too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"request body is larger than the limit of {limit} bytes")


class Guard:
    def __init__(self, app, api_key: str | None, max_bytes: int, protect_all: bool = False,
                 on_error: Callable[[int], None] = lambda status: None):
        """`protect_all`: the API key guards every path but the probes; `on_error(status)`:
        counts the errors answered here (the server's metrics)."""
        self.app, self.api_key, self.max_bytes, self.on_error = app, api_key, max_bytes, on_error
        self.protect_all = protect_all

    def protects(self, path: str) -> bool:
        if self.protect_all:
            return path not in ALWAYS_OPEN
        return path.startswith(PROTECTED)

    async def refuse(self, exc: Exception, scope, receive, send, headers=()):
        self.on_error(classify(exc)[0])
        response = error_response(exc)
        for name, value in headers:
            response.headers[name] = value
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and self.protects(scope["path"]):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = AuthenticationError("invalid or missing API key: send 'Authorization: Bearer KEY'")
                return await self.refuse(error, scope, receive, send, [("WWW-Authenticate", "Bearer")])
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self.refuse(too_large(self.max_bytes), scope, receive, send)
            return await self.app(scope, receive, send)
        # No Content-Length (a chunked body): read it here, up to the limit, so that one over
        # it is a 413 and not the app's parse error; the app then reads it as it came.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                return await self.refuse(too_large(self.max_bytes), scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        return await self.app(scope, replay, send)
