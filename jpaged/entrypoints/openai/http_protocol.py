"""uvicorn's h11 HTTP/1.1 protocol with connection hygiene. uvicorn has no header-read
timeout: a connection that never sends a byte, or trickles one byte at a time, is held
forever. Here an idle connection closes after `timeout_keep_alive`; a request's headers, then
its body, must each arrive whole within a deadline (a total, not reset by each byte, so a
slowloris fails); past `max_connections` a new connection is answered 503 and closed."""
from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerConfig


def raw_error(status: int, reason: str, type: str, message: str, extra: str = "") -> bytes:
    """A whole `Connection: close` response with an OpenAI error body, as bytes: h11 refuses
    to send a Response before it has received a Request, so these bypass it."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": status}})
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body.encode("utf-8")


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = ServerConfig.header_timeout
    body_timeout: float = ServerConfig.body_timeout
    max_connections: int = ServerConfig.max_connections

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            # Out of the set at once, so uvicorn's bookkeeping (shutdown, limit_concurrency)
            # never counts it; connection_lost's discard is then a no-op.
            self.connections.discard(self)
            transport.write(raw_error(503, "Service Unavailable", "server_error",
                                      "Too many open connections; retry shortly.", "Retry-After: 1\r\n"))
            transport.close()
            return
        # uvicorn arms its idle timer only after a response; a fresh connection gets it too.
        # Same attribute, so uvicorn's data_received cancels it on the first byte.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        # The first byte of a request starts its header deadline.
        if self.header_timer is None and self.conn.their_state is h11.IDLE:
            self.header_timer = self.loop.call_later(self.header_timeout, self.header_timeout_handler)
        super().data_received(data)

    def handle_events(self) -> None:
        # Also runs from on_response_complete for pipelined requests, so timers follow
        # h11's state wherever it moves.
        super().handle_events()
        state = self.conn.their_state
        if state is not h11.IDLE:  # headers are in (or the connection is done for)
            self.cancel_timer("header_timer")
        if state is h11.SEND_BODY and self.body_timer is None and not self.transport.is_closing():
            self.body_timer = self.loop.call_later(self.body_timeout, self.body_timeout_handler)
        elif state is not h11.SEND_BODY:  # EndOfMessage received, or the connection ended
            self.cancel_timer("body_timer")

    def cancel_timer(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def header_timeout_handler(self) -> None:
        self.header_timer = None
        self.abort(raw_error(408, "Request Timeout", "invalid_request_error",
                             f"Request headers not received within {self.header_timeout:g} s."))

    def body_timeout_handler(self) -> None:
        self.body_timer = None
        # A 408 only while no response has begun; once it has, the bytes would corrupt it.
        started = self.conn.our_state is not h11.SEND_RESPONSE
        self.abort(None if started else raw_error(
            408, "Request Timeout", "invalid_request_error",
            f"Request body not received within {self.body_timeout:g} s."))

    def abort(self, response: bytes | None) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # As connection_lost would, but now: the app sees http.disconnect, and a send it
            # makes before connection_lost runs is dropped instead of following our 408.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if response is not None:
            self.transport.write(response)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer("header_timer")
        self.cancel_timer("body_timer")
        self._unset_keepalive_if_required()  # uvicorn leaves it armed when exc is not None
        super().connection_lost(exc)


def protocol_class(header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """A GuardedH11Protocol subclass carrying these limits, for `uvicorn.Config(http=...)`
    (uvicorn constructs the protocol itself, so the values travel on the class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": header_timeout, "body_timeout": body_timeout,
        "max_connections": max_connections})
