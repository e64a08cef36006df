"""Connection hygiene of jpaged's uvicorn protocol (jpaged/entrypoints/openai/http_protocol.py),
over raw sockets against a real uvicorn server running in a background thread."""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from jpaged.entrypoints.openai.http_protocol import protocol_class

BOUND = 10.0  # generous bound for anything the server should do "soon"
client_gone = threading.Event()  # set when the POST route sees the client disconnect


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def echo(request: Request) -> JSONResponse:
    try:
        body = await request.body()
    except ClientDisconnect:
        client_gone.set()
        return JSONResponse({}, status_code=499)  # never sent: the connection is gone
    return JSONResponse({"length": len(body)})


app = Starlette(routes=[Route("/", hello), Route("/echo", echo, methods=["POST"])])


def start_server(header: float, body: float, idle: float, cap: int):
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=protocol_class(header, body, cap),
                            timeout_keep_alive=idle, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + BOUND
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def stop_server(server, thread) -> None:
    server.should_exit = True
    thread.join(BOUND)


@pytest.fixture(scope="module")
def port():
    server, thread, port = start_server(header=0.5, body=0.5, idle=0.5, cap=50)
    yield port
    stop_server(server, thread)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=BOUND)


def read_until_closed(sock: socket.socket, bound: float = BOUND) -> bytes:
    """Everything the server sends until it closes the connection; fails if it stays open."""
    sock.settimeout(bound)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def split_response(data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """(status line, headers, body) of one response's bytes."""
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, {k.strip().lower(): v.strip() for k, v in (ln.decode().split(":", 1) for ln in lines)}, body


def read_response(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """One Content-Length response from a connection that stays open."""
    data = b""
    while True:
        if b"\r\n\r\n" in data:
            status, headers, body = split_response(data)
            if len(body) >= int(headers["content-length"]):
                return status, headers, body
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk


def assert_error(data: bytes, status: bytes, code: int, type: str) -> dict[str, str]:
    """`data` is one whole `Connection: close` JSON error response; returns its headers."""
    status_line, headers, body = split_response(data)
    assert status_line.startswith(b"HTTP/1.1 " + status), data
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == code and error["type"] == type and error["param"] is None and error["message"]
    return headers


def test_silent_connection_is_closed(port):
    with connect(port) as sock:
        assert read_until_closed(sock) == b""


def test_trickled_headers_get_408_while_still_trickling(port):
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"  # ~23 s at 0.1 s/byte
    with connect(port) as sock:
        sent = 0
        # One byte per 0.1 s (well under the idle timeout, so only a total deadline can stop it).
        while sent < len(request) and not select.select([sock], [], [], 0.1)[0]:
            sock.sendall(request[sent:sent + 1])
            sent += 1
        assert 0 < sent < len(request) // 2, "server let a slowloris trickle on"
        assert_error(read_until_closed(sock), b"408", 408, "invalid_request_error")


def test_stalled_body_is_closed(port):
    client_gone.clear()
    with connect(port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        data = read_until_closed(sock)
    # No response had begun, so the server says why before closing.
    assert_error(data, b"408", 408, "invalid_request_error")
    assert client_gone.wait(BOUND), "the app was not told the client is gone"


def test_keep_alive_serves_two_requests(port):
    with connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body) == {"hello": "world"}
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 37\r\n\r\n" + b"y" * 37)
        status, _, body = read_response(sock)
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body) == {"length": 37}
        # Idle again after the response: closed by the keep-alive timeout.
        assert read_until_closed(sock) == b""


def fd_count() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(BOUND)


def test_connection_cap_refuses_with_503_and_bounds_descriptors():
    cap, slack = 20, 10
    # Timeouts long enough that the held connections outlive the refusals below.
    server, thread, port = start_server(header=4.0, body=4.0, idle=4.0, cap=cap)
    try:
        baseline = fd_count()
        held = [connect(port) for _ in range(cap)]
        deadline = time.monotonic() + BOUND  # accepted server-side before the next one comes
        while len(server.server_state.connections) < cap:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # The server and this test share a process: count its descriptors net of our own sockets.
        peak = 0
        for _ in range(1 + 200):
            with connect(port) as sock:
                headers = assert_error(read_until_closed(sock), b"503", 503, "server_error")
                assert headers["retry-after"] == "1"
                peak = max(peak, fd_count() - baseline - len(held) - 1)
        assert peak <= cap + slack, f"server held {peak} descriptors, cap is {cap}"
        assert all(still_open(sock) for sock in held), "held connections closed before the test ended"
        # The idle timeout frees the held ones; then the server serves again.
        for sock in held:
            assert read_until_closed(sock) == b""
            sock.close()
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status, _, body = read_response(sock)
            assert status.startswith(b"HTTP/1.1 200") and json.loads(body) == {"hello": "world"}
    finally:
        stop_server(server, thread)
