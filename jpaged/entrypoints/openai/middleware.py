"""ASGI middleware in front of the routes: the API key on protected paths and the request
body size limit (by Content-Length, and by counting a body without one as it arrives)."""
from __future__ import annotations

import hmac

from jpaged.exceptions import AuthenticationError, RequestTooLargeError

from .errors import error_response

PROTECTED = ("/v1/", "/tokenize", "/detokenize")


def too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"request body is larger than the limit of {limit} bytes")


class Guard:
    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith(PROTECTED):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = AuthenticationError("invalid or missing API key: send 'Authorization: Bearer KEY'")
                return await error_response(error)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(too_large(self.max_bytes))(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message
        return await self.app(scope, limited_receive, send)
