"""Hostile and careless clients over a real socket (the session's tiny server on 127.0.0.1):
each bad input gets a 4xx with an OpenAI-shaped body that names the field, and the
keep-alive connection it came on still serves the next request."""
from __future__ import annotations

import collections
import contextlib
import http.client
import json
import urllib.parse

import pytest

SURROGATE = "\ud800"  # a lone UTF-16 surrogate: valid JSON ("\ud800"), not Unicode text


def connect(handle) -> http.client.HTTPConnection:
    """One keep-alive connection to a running server."""
    url = urllib.parse.urlparse(handle.url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=60)


@pytest.fixture()
def conn(tiny_server):
    with contextlib.closing(connect(tiny_server)) as c:
        yield c


def post(conn, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: \ud800 escaped
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def hold(monkeypatch, state, method: str):
    """Make the server's `state.<method>` (run in a tokenizer worker) wait until released:
    returns (started, release) events."""
    import threading
    started, release = threading.Event(), threading.Event()
    original = getattr(state, method)

    def held(*args):
        started.set()
        release.wait(60)
        return original(*args)
    monkeypatch.setattr(state, method, held)
    return started, release


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
    started, release = hold(monkeypatch, tiny_server.app.state.jpaged, "text_ids")
    done = []

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


# ---- bounds and fairness ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded(tiny_server):
    """A second app over the session's engine, with small per-request limits."""
    from jpaged.entrypoints.openai.api_server import create_app
    from jpaged.entrypoints.openai.launcher import ServerHandle
    app = create_app(tiny_server.engine, "tiny", max_n=4, max_prompts_per_request=4,
                     max_sequences_per_request=6, max_tokens_per_request=200,
                     max_stop_sequences=3, max_waiting_requests=4)
    with ServerHandle(app, tiny_server.engine, own_engine=False) as handle:
        yield handle


@pytest.fixture()
def bounded_conn(bounded):
    with contextlib.closing(connect(bounded)) as c:
        yield c


@pytest.mark.parametrize("body,field,words", [
    ({"prompt": ["a"] * 5}, "prompt", "at most 4"),
    ({"prompt": [[1, 2]] * 5}, "prompt", "at most 4"),
    ({"prompt": ["a", "b"], "n": 4}, "n", "8 sequences"),
    ({"prompt": ["a", "b"], "best_of": 4}, "n", "at most 6"),
    ({"prompt": ["a", "b"], "n": 2, "max_tokens": 60}, "max_tokens", "at most 200"),
    ({"prompt": "a", "n": 2, "max_tokens": None}, "max_tokens", "at most 200"),  # null: what is left of 128
    ({"prompt": "a", "stop": ["x", "y", "z", "w"]}, "stop", "at most 3"),
    ({"prompt": "a", "stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids", "at most 3"),
])
def test_a_request_over_a_bound_is_a_400_naming_the_field(bounded, bounded_conn, body, field, words):
    status, reply = post(bounded_conn, "/v1/completions", {"model": "tiny", "max_tokens": 2, **body})
    assert words in assert_error(status, reply, 400, field)
    assert sum(len(w.prompts) for w in bounded.app.state.jpaged._waiting) == 0  # none kept
    still_serves(bounded_conn)


def test_a_chat_over_the_sequence_bound_is_a_400(bounded_conn):
    status, reply = post(bounded_conn, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "Hi"}], "n": 4, "best_of": 4,
                          "max_tokens": 60})
    assert "max_tokens" in assert_error(status, reply, 400, "max_tokens")
    still_serves(bounded_conn)


def test_a_full_queue_is_a_503_with_retry_after(bounded, bounded_conn, monkeypatch):
    """Prompts hold their places in the queue from acceptance to their first token: with
    4 places, a held request of 4 prompts fills it, and the next is refused at once."""
    import threading

    import httpx
    state = bounded.app.state.jpaged
    original = state.prompts
    started, release = hold(monkeypatch, state, "prompts")
    results = []

    def fill():
        results.append(httpx.post(bounded.url + "/v1/completions", timeout=120,
                                  json={"prompt": ["a", "b", "c", "d"], "max_tokens": 2}))
    worker = threading.Thread(target=fill)
    worker.start()
    try:
        assert started.wait(60)
        bounded_conn.request("POST", "/v1/completions", json.dumps({"prompt": "e"}).encode(),
                             {"Content-Type": "application/json"})
        r = bounded_conn.getresponse()
        reply = json.loads(r.read())
        assert r.status == 503 and r.getheader("Retry-After") == "1", reply
        assert reply["error"]["code"] == "server_overloaded" and "queue is full" in reply["error"]["message"]
    finally:
        release.set()
        worker.join()
    assert results[0].status_code == 200 and len(results[0].json()["choices"]) == 4
    monkeypatch.setattr(state, "prompts", original)
    still_serves(bounded_conn)  # the places were given back
    assert sum(len(w.prompts) for w in state._waiting) == 0


def test_a_small_request_behind_a_huge_one_finishes_first(tiny_server):
    """Admission takes turns between requests: a 1-token request sent while one of 48
    prompts x n=4 (192 sequences; the engine runs 8 at a time) runs finishes first, where
    first come, first served between sequences would put it behind all 192."""
    import threading

    import httpx
    order, first_token = [], threading.Event()

    def huge():
        with httpx.stream("POST", tiny_server.url + "/v1/completions", timeout=300, json={
                "model": "tiny", "prompt": [f"item {i}" for i in range(48)], "n": 4,
                "max_tokens": 6, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    first_token.set()
        order.append("huge")
    worker = threading.Thread(target=huge)
    worker.start()
    try:
        assert first_token.wait(120)
        r = httpx.post(tiny_server.url + "/v1/completions", timeout=300,
                       json={"model": "tiny", "prompt": "small", "max_tokens": 1})
        assert r.status_code == 200
        order.append("small")
    finally:
        worker.join()
    assert order == ["small", "huge"]


# ---- slow connections ------------------------------------------------------------------------


def _server_fds(own: int) -> int:
    """Open descriptors of this process (the server runs in it) net of the test's own sockets."""
    import os
    return len(os.listdir(f"/proc/{os.getpid()}/fd")) - own


def test_slow_connections_are_cut_off_and_descriptors_stay_bounded(tiny_server):
    """A slowloris: 200 connections that trickle header bytes and never finish. The server
    holds at most `max_connections` of them (one more is answered 503 and closed), cuts each
    off at its header deadline (408), and serves again once they are gone."""
    import socket
    import time

    import httpx

    from jpaged.entrypoints.openai.api_server import create_app
    from jpaged.entrypoints.openai.config import ServerConfig
    from jpaged.entrypoints.openai.launcher import ServerHandle
    cap, slack = 40, 12
    config = ServerConfig(port=0, log_level="error", max_connections=cap, header_timeout=1.0,
                          timeout_keep_alive=1.0)
    with ServerHandle(create_app(tiny_server.engine, "tiny"), tiny_server.engine, config,
                      own_engine=False) as h:
        assert httpx.get(h.url + "/health").status_code == 200
        baseline = _server_fds(0)
        live, answers, peak = [], [], 0
        deadline = time.monotonic() + 60
        while (len(answers) < 200 or live) and time.monotonic() < deadline:
            if len(answers) + len(live) < 200:  # ten new slow clients every tick
                for _ in range(10):
                    sock = socket.create_connection(("127.0.0.1", h.port))
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    live.append([sock, b""])
            for entry in list(live):  # one more header byte each; collect what the server says
                sock = entry[0]
                try:
                    sock.sendall(b"a")
                    sock.setblocking(False)
                    chunk = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:  # reset: the server closed it
                    chunk = b""
                finally:
                    sock.setblocking(True)
                entry[1] += chunk
                if not chunk:
                    answers.append(entry[1])
                    live.remove(entry)
                    sock.close()
            peak = max(peak, _server_fds(len(live)) - baseline)
            time.sleep(0.1)
        assert not live, f"{len(live)} slow connections were never closed"
        assert peak <= cap + slack, f"the server held {peak} descriptors; max_connections is {cap}"
        statuses = collections.Counter(a.split(b" ", 2)[1] if a else b"closed" for a in answers)
        assert statuses[b"408"] >= cap // 2 and set(statuses) <= {b"408", b"503", b"closed"}, statuses
        assert httpx.get(h.url + "/health").status_code == 200  # it serves again
        assert _server_fds(0) - baseline <= slack


# ---- a longer mix ----------------------------------------------------------------------------

BAD_BODIES = [
    b"", b"{", b"[]", b"null", b'{"prompt": ', b"\xff\xfe", b'{"prompt": "\\ud800"}',
    b'{"prompt": "Hi", "max_tokens": "2"}', b'{"prompt": "Hi", "n": 99}', b'{"prompt": [true]}',
    b'{"prompt": "Hi", "stream": "yes"}', b'{"prompt": "Hi", "temperature": -1}',
    b'{"prompt": "Hi", "logprobs": 1000}', b'{"prompt": [99999999]}', b'{"prompt": []}',
    b'{"prompt": "Hi", "stop": ' + json.dumps(["x"] * 500).encode() + b"}",
    b'{"prompt": ' + json.dumps(["Hi"] * 2000).encode() + b"}",
    b'{"prompt": "' + b"word " * 4000 + b'"}', b"[" * 10000 + b"]" * 10000,
    b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
]


@pytest.mark.slow
def test_a_longer_hostile_mix_leaves_the_server_serving_and_nothing_behind(tiny_server):
    """45 s of bad bodies, abandoned streams and slow connections beside good clients whose
    token counts must be exact: no 5xx, every good answer right, and afterwards no request
    in the engine, no KV block held and no place in the server's queue."""
    import random
    import socket
    import threading
    import time

    import httpx

    from helpers import assert_pool_free, wait_idle
    url, stop, failures, counts = tiny_server.url, time.monotonic() + 45, [], collections.Counter()

    def guard(fn):
        def run():
            try:
                while time.monotonic() < stop:
                    fn()
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(f"{fn.__name__}: {e!r}")
        return threading.Thread(target=run)

    rng = random.Random(0)

    def good():
        k = rng.randint(1, 8)
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "count " * rng.randint(1, 20), "max_tokens": k,
            "ignore_eos": True, "n": rng.randint(1, 2)})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == k * len(r.json()["choices"])
        counts["good"] += 1

    def bad():
        body = rng.choice(BAD_BODIES)
        path = "/v1/chat/completions" if body.startswith(b'{"messages"') else "/v1/completions"
        r = httpx.post(url + path, content=body, timeout=120, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.json(), (body[:80], r.status_code, r.text[:200])
        counts["bad"] += 1

    def abandon():
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "go on"}], "max_tokens": 100,
                "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the client goes away mid-stream
        counts["abandoned"] += 1

    def slow():
        with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=120) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(rng.uniform(0.1, 2))  # then leaves with the body unfinished
        counts["slow"] += 1

    threads = [guard(fn) for fn in (good, good, bad, abandon, slow)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert min(counts[k] for k in ("good", "bad", "abandoned", "slow")) > 0, counts
    assert httpx.get(url + "/health").status_code == 200
    assert wait_idle(tiny_server)[0] == 0
    assert_pool_free(tiny_server)
    assert sum(len(w.prompts) for w in tiny_server.app.state.jpaged._waiting) == 0
