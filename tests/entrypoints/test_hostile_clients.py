"""Hostile and careless clients over a real socket (the session's tiny server on 127.0.0.1):
each bad input gets a 4xx with an OpenAI-shaped body that names the field, and the
keep-alive connection it came on still serves the next request."""
from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest

SURROGATE = "\ud800"  # a lone UTF-16 surrogate: valid JSON ("\ud800"), not Unicode text


@pytest.fixture()
def conn(tiny_server):
    """One keep-alive connection to the server."""
    url = urllib.parse.urlparse(tiny_server.url)
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    yield c
    c.close()


def post(conn, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: \ud800 escaped
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def still_serves(conn) -> None:
    """The same connection answers a good request after the error."""
    status, body = post(conn, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2


def assert_error(status: int, body: dict, want_status: int, field: str) -> str:
    assert status == want_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field, error
    assert "Error" not in error["message"] and "Traceback" not in error["message"], error
    return error["message"]


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "a" + SURROGATE}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", SURROGATE]}, "prompt"),
    ("/v1/completions", {"prompt": SURROGATE, "echo": True}, "prompt"),
    ("/v1/completions", {"prompt": SURROGATE, "stream": True}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "stop": [SURROGATE]}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "model": SURROGATE}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}, "messages"),
    ("/tokenize", {"prompt": "x" + SURROGATE}, "prompt"),
])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(conn, path, body, field):
    status, reply = post(conn, path, body)
    message = assert_error(status, reply, 400, field)
    assert "surrogate" in message
    still_serves(conn)


@pytest.mark.parametrize("path,body,field,expected", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "2"}, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "0.5"}, "temperature", "number"),
    ("/v1/completions", {"prompt": "Hi", "n": 2.0}, "n", "integer"),
    ("/v1/completions", {"prompt": [True]}, "prompt", "integer"),
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, "stream", "boolean"),
    ("/v1/completions", {"prompt": "Hi", "echo": 1}, "echo", "boolean"),
    ("/v1/completions", {"prompt": "Hi", "seed": True}, "seed", "integer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": "true"},
     "logprobs", "boolean"),
    ("/detokenize", {"tokens": ["1"]}, "tokens", "integer"),
])
def test_a_field_of_the_wrong_type_is_a_400_naming_field_and_type(conn, path, body, field, expected):
    status, reply = post(conn, path, body)
    message = assert_error(status, reply, 400, field)
    assert field in message and expected in message, message
    still_serves(conn)


def test_integers_are_numbers_and_null_means_the_default(conn):
    status, body = post(conn, "/v1/completions", {
        "model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0, "top_p": 1,
        "seed": None, "stop": None, "logprobs": None, "presence_penalty": 0})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 3


def test_a_huge_model_name_is_not_echoed_back_whole(conn):
    status, body = post(conn, "/v1/completions", {"model": "m" * (1 << 20), "prompt": "Hi"})
    assert status == 404, body
    assert body["error"]["code"] == "model_not_found"
    assert len(body["error"]["message"]) < 400
    still_serves(conn)


def test_a_body_without_a_json_content_type_names_the_header(conn):
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi"}).encode(),
                 {"Content-Type": "text/plain"})
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 400 and "Content-Type: application/json" in body["error"]["message"], body
    still_serves(conn)


def test_a_chunked_body_over_the_limit_is_a_413(conn):
    from jpaged.entrypoints.openai.config import ServerConfig
    limit = ServerConfig.max_request_bytes  # the session's server keeps the default
    chunk = b" " * (1 << 16)

    def body():  # valid JSON at any length: whitespace, then an object
        for _ in range(limit // len(chunk) + 1):
            yield chunk
        yield b'{"prompt": "Hi"}'
    conn.request("POST", "/v1/completions", body(), {"Content-Type": "application/json"},
                 encode_chunked=True)
    r = conn.getresponse()
    reply = json.loads(r.read())
    assert r.status == 413 and reply["error"]["code"] == "request_too_large", reply


def test_a_chunked_body_under_the_limit_is_served(conn):
    conn.request("POST", "/v1/completions", iter([b'{"model": "tiny", ', b'"prompt": "Hi", "max_tokens": 2}']),
                 {"Content-Type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 200 and body["usage"]["completion_tokens"] == 2, body


@pytest.mark.parametrize("messages,field,words", [
    ([{"role": "user", "content": [{"type": "text"}]}], "messages", "'text' field"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages", "only 'text'"),
    ([{"role": "user", "content": "word " * 400}], "messages", "context length"),
])
def test_chat_errors_name_messages(conn, messages, field, words):
    status, reply = post(conn, "/v1/chat/completions", {"messages": messages})
    assert words in assert_error(status, reply, 400, field)
    still_serves(conn)


@pytest.mark.parametrize("path", ["/health", "/ready", "/v1/models"])
def test_head_answers_where_get_does(conn, path):
    conn.request("HEAD", path)
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b""
    still_serves(conn)


def test_a_trailing_slash_is_not_redirected_through_the_host_header(conn):
    conn.request("GET", "/v1/models/", headers={"Host": "evil.example"})
    r = conn.getresponse()
    r.read()
    assert r.status == 404 and r.getheader("Location") is None
    still_serves(conn)


def test_health_is_answered_while_a_prompt_is_tokenized(tiny_server, monkeypatch):
    """Tokenization runs off the event loop: with a /tokenize request held inside its
    tokenization (as a 4 MB prompt holds it for seconds), a /health probe is answered. On
    the event loop, the held tokenization would block the probe until it ends."""
    import threading

    import httpx
    state = tiny_server.app.state.jpaged
    started, release, done = threading.Event(), threading.Event(), []
    original = state.text_ids

    def held(*args):
        started.set()
        release.wait(60)
        return original(*args)
    monkeypatch.setattr(state, "text_ids", held)

    def tokenize():
        r = httpx.post(tiny_server.url + "/tokenize", json={"prompt": "hello there"}, timeout=120)
        assert r.status_code == 200 and r.json()["count"] > 0
        done.append("tokenize")
    worker = threading.Thread(target=tokenize)
    worker.start()
    try:
        assert started.wait(60)
        assert httpx.get(tiny_server.url + "/health", timeout=10).status_code == 200
        done.append("health")
    finally:
        release.set()
        worker.join()
    assert done == ["health", "tokenize"]
