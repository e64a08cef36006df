"""The server's research-pipeline endpoints (vLLM's RL API): /pause, /resume, /is_paused,
/sleep, /wake_up, /is_sleeping. Off by default (the shared tiny server has none); here on a
server of their own, behind an API key, its engine core in a process of its own."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from helpers import TINY_SERVER_ARGS

KEY = {"Authorization": "Bearer sesame"}
CONTROL = [("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"), ("POST", "/sleep"),
           ("POST", "/wake_up"), ("GET", "/is_sleeping")]


@pytest.fixture(scope="module")
def control_server(tiny_text_model):
    from jpaged import start_server
    handle = start_server(tiny_text_model, served_model_name="tiny", api_key="sesame",
                          enable_control_endpoints=True, warmup=False, **TINY_SERVER_ARGS)
    yield handle
    handle.shutdown()


def test_control_endpoints_are_off_by_default_and_keyed_when_on(tiny_server, control_server):
    for method, path in CONTROL:
        assert httpx.request(method, tiny_server.url + path).status_code == 404, path
        assert httpx.request(method, control_server.url + path).status_code == 401, path
    paths = httpx.get(tiny_server.url + "/openapi.json").json()["paths"]
    assert not {p for _, p in CONTROL} & set(paths)


def completion(url: str, max_tokens: int = 24) -> dict:
    r = httpx.post(url + "/v1/completions", headers=KEY, timeout=120, json={
        "model": "tiny", "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_pause_holds_requests_until_resume(control_server):
    url = control_server.url
    before = completion(url)
    assert httpx.post(url + "/pause", headers=KEY, params={"mode": "keep"}).json() == {"status": "paused"}
    try:
        assert httpx.get(url + "/is_paused", headers=KEY).json() == {"is_paused": True}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(completion, url)
            time.sleep(0.5)
            assert not waiting.done()  # held while paused
            assert httpx.post(url + "/resume", headers=KEY).json() == {"status": "running"}
            after = waiting.result(timeout=60)
    finally:
        httpx.post(url + "/resume", headers=KEY)
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
    assert httpx.get(url + "/is_paused", headers=KEY).json() == {"is_paused": False}


def test_pause_abort_ends_the_requests_in_flight(control_server):
    url = control_server.url
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(completion, url, 120)
        time.sleep(0.3)
        try:
            assert httpx.post(url + "/pause", headers=KEY, params={"mode": "abort"}).status_code == 200
        finally:
            httpx.post(url + "/resume", headers=KEY)
        choice = running.result(timeout=60)["choices"][0]
    assert choice["finish_reason"] in ("abort", "length")  # "length" if it won the race
    r = httpx.post(url + "/pause", headers=KEY, params={"mode": "later"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"


def test_sleep_and_wake_up(control_server):
    url = control_server.url
    before = completion(url)
    assert httpx.post(url + "/sleep", headers=KEY, params={"level": 1}).json() == {"status": "sleeping"}
    try:
        assert httpx.get(url + "/is_sleeping", headers=KEY).json() == {"is_sleeping": True}
        assert httpx.post(url + "/sleep", headers=KEY, params={"level": 1}).status_code == 409  # asleep already
    finally:
        assert httpx.post(url + "/wake_up", headers=KEY).json() == {"status": "awake"}
    assert httpx.get(url + "/is_sleeping", headers=KEY).json() == {"is_sleeping": False}
    assert completion(url)["choices"][0]["text"] == before["choices"][0]["text"]
    assert httpx.post(url + "/sleep", headers=KEY, params={"level": 3}).status_code == 400
