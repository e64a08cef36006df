"""The OpenAI-compatible server over real sockets on 127.0.0.1, through the `openai` client.

Most tests use one server over a tiny random model (with the default tokenizer, so it
serves text); greedy text is checked against `LLM.generate` on the default model.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import pathlib
import socket
import threading
import time

import httpx
import openai
import pytest

from helpers import assert_pool_free, check_normal_request, engine_state, metric_values

# ---- greedy text equals LLM.generate (the default model) -----------------------------------


def test_greedy_text_equals_llm_generate():
    from jpaged import LLM, SamplingParams
    from jpaged import start_server
    llm = LLM(max_num_seqs=8, max_model_len=512, kv_cache_memory=64 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    prompt = "The capital of France is"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want_text = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    want_chat = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    with start_server(llm, warmup=False) as h:  # the server owns the same engine from here on
        c = openai.OpenAI(base_url=h.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct"]
        r = c.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=24,
                                 temperature=0)
        assert r.choices[0].text == want_text.text
        assert r.usage.completion_tokens == len(want_text.token_ids)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert streamed == want_text.text
        r = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                      max_tokens=24, temperature=0)
        assert r.choices[0].message.content == want_chat.text
        assert r.choices[0].finish_reason == want_chat.finish_reason
        chunks = list(c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                max_tokens=24, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want_chat.text


# ---- completions and chat on the tiny model --------------------------------------------------


def test_completions_stream_and_not(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw, logprobs=2)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert "".join(lp.tokens) == choice.text and all(len(t) >= 2 for t in lp.top_logprobs)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # several prompts, n, echo and seeded sampling
    r = client.completions.create(model="tiny", prompt=["a b c", "x y z"], n=2, max_tokens=4,
                                  seed=7, temperature=1.0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("a b c") and r.usage.completion_tokens == 16
    again = client.completions.create(model="tiny", prompt="a b c", n=2, max_tokens=4, seed=7,
                                      temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text[len("a b c"):] for c in r.choices[:2]]
    ids = client.completions.create(model="tiny", prompt=[40, 41, 42], max_tokens=2, temperature=0,
                                    echo=True)
    assert ids.usage.prompt_tokens == 3 and ids.choices[0].text.startswith("89:")


def test_chat_stream_and_not(client, tiny_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True, "min_tokens": 2})
    msg = r.choices[0]
    assert r.object == "chat.completion" and msg.message.role == "assistant"
    assert len(msg.logprobs.content) == 8 and len(msg.logprobs.content[0].top_logprobs) == 2
    assert r.usage.completion_tokens == 8
    # raw SSE: role chunk first, usage chunk last, then [DONE]
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", tiny_server.url + "/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["usage"]["completion_tokens"] == 8
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == msg.message.content


def test_a_request_without_sampling_fields_takes_the_engine_defaults(client):
    """The tiny model's generation config sets no sampling field: jpaged's default, greedy
    (a seeded temperature-1 request shows that sampling would differ)."""
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(**kw, temperature=0).choices[0].text
    assert client.completions.create(**kw).choices[0].text == greedy
    assert client.completions.create(**kw, temperature=1.0, seed=3).choices[0].text != greedy


def test_stop_string_is_cut(client):
    full = client.completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    if not stop.strip():
        pytest.skip("no usable stop string in this text")
    want = full[:full.index(stop)]
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=10, temperature=0, stop=stop,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once", max_tokens=10, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == want


def test_echo_logprobs_cover_the_prompt_and_prompt_logprobs(client, tiny_server):
    """echo + logprobs: the prompt's tokens come first (the first one null), from the
    engine's prompt logprobs, offsets running through the echoed text, streamed or not;
    vLLM's `prompt_logprobs` field (per choice in completions, on a chat response), through
    the engine's own process."""
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=3, temperature=0,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw, logprobs=2).choices[0].logprobs
    r = client.completions.create(**kw, logprobs=2, echo=True)
    choice, lp, P = r.choices[0], r.choices[0].logprobs, r.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == P + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    assert lp.tokens[P:] == plain.tokens and lp.token_logprobs[P:] == pytest.approx(plain.token_logprobs)
    assert "".join(lp.tokens) == choice.text
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets
    chunks = list(client.completions.create(**kw, logprobs=2, echo=True, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((x.tokens for x in streamed), []) == lp.tokens
    assert sum((x.text_offset for x in streamed), []) == lp.text_offset
    ids = httpx.post(tiny_server.url + "/tokenize", json={"prompt": kw["prompt"]}).json()["tokens"]
    body = {"model": "tiny", "prompt": kw["prompt"], "max_tokens": 1, "prompt_logprobs": 1}
    plp = httpx.post(tiny_server.url + "/v1/completions", json=body).json()["choices"][0]
    plp = plp["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids) == P
    for j in range(1, P):
        own = plp[j][str(ids[j])]
        assert own["logprob"] == pytest.approx(lp.token_logprobs[j], abs=1e-5) and own["rank"] >= 1
        assert own["decoded_token"] == lp.tokens[j]
        assert any(e["rank"] == 1 for e in plp[j].values())
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
            "prompt_logprobs": 0}
    chat = httpx.post(tiny_server.url + "/v1/chat/completions", json=body).json()
    plp = chat["prompt_logprobs"]
    assert plp[0] is None and len(plp) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in plp[1:])


# ---- load: 32 concurrent streaming clients ---------------------------------------------------


def test_32_concurrent_streams_get_exactly_their_tokens(tiny_server):
    lengths = [1 + (7 * i) % 40 for i in range(32)]

    async def one(c, i, n):
        tokens, text, finish = 0, "", None
        stream = await c.completions.create(
            model="tiny", prompt=f"Request {i}: " + "word " * (i % 9), max_tokens=n,
            temperature=0, logprobs=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            ch = chunk.choices[0]
            tokens += len(ch.logprobs.tokens) if ch.logprobs else 0
            text += ch.text
            finish = ch.finish_reason or finish
        return tokens, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="x",
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, i, n) for i, n in enumerate(lengths)))
    results = asyncio.run(main())
    assert [t for t, _ in results] == lengths
    assert all(f == "length" for _, f in results)
    assert_pool_free(tiny_server)


# ---- abort on disconnect ---------------------------------------------------------------------


def test_disconnect_aborts_and_frees_blocks(tiny_server, client):
    before = metric_values(tiny_server.url).get("jpaged:request_aborted_total", 0)
    body = {"model": "tiny", "prompt": "abort me " * 4, "max_tokens": 100, "temperature": 0,
            "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body) as resp:
            seen = 0
            for line in resp.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 2:
                    break  # leaving the block closes the connection mid-stream
    # non-streaming clients that give up while their requests run
    body["stream"] = False
    payload = json.dumps(body).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    socks = [socket.create_connection((tiny_server.host, tiny_server.port)) for _ in range(2)]
    for sock in socks:
        sock.sendall(request)
    deadline = time.monotonic() + 30
    while engine_state(tiny_server)[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    for sock in socks:
        sock.close()
    assert_pool_free(tiny_server)
    assert metric_values(tiny_server.url)["jpaged:request_aborted_total"] >= before + 5
    check_normal_request(client)


# ---- bad input -------------------------------------------------------------------------------

BAD = [  # (path, body, status, words in the message, param)
    ("/v1/completions", b"{not json", 400, "malformed JSON", None),
    ("/v1/completions", {"prompt": 3}, 400, "prompt", "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-5"}, 404, "gpt-5", "model"),
    ("/v1/completions", {"prompt": "word " * 200}, 400, "maximum context length", "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 500}, 400, "maximum context length", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 50}, 400, "n and best_of", "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "log-probabilities", "logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 99}, 400, "log-probabilities",
     "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 1,
                              "stream": True}, 400, "stream", "prompt_logprobs"),
    ("/v1/completions", {"prompt": [123456789]}, 400, "outside the vocabulary", "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "empty", "prompt"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, 400, "min_tokens", "min_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", "best_of"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "logprobs", "top_logprobs"),
    ("/detokenize", {"tokens": [-1]}, 400, "greater than or equal to 0", "tokens"),
    ("/detokenize", {"tokens": [49152]}, 400, "outside the vocabulary", "tokens"),
    ("/v1/nothing", {}, 404, "Not Found", None),
]


@pytest.mark.parametrize("path,body,status,words,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_4xx_and_server_goes_on(tiny_server, client, path, body, status, words, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(tiny_server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"], err
    check_normal_request(client)


def test_body_too_large_is_413(tiny_server, client):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"prompt": "x" * (5 << 20)})
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]
    check_normal_request(client)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=10_000)


# ---- auth ------------------------------------------------------------------------------------


def test_api_key(tiny_server):
    from jpaged.entrypoints.openai.api_server import create_app
    from jpaged.entrypoints.openai.launcher import ServerHandle
    app = create_app(tiny_server.engine, "tiny", api_key="sekret")
    with ServerHandle(app, tiny_server.engine, own_engine=False) as h:
        errors = metric_values(h.url).get("jpaged:request_errors_total", 0.0)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(h.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(h.url + "/v1/models").status_code == 401
        assert httpx.get(h.url + "/health").status_code == 200  # not under /v1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=h.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert metric_values(h.url)["jpaged:request_errors_total"] == errors + 5  # 401s count
        good = openai.OpenAI(base_url=h.url + "/v1", api_key="sekret", max_retries=0)
        check_normal_request(good)


@pytest.mark.parametrize("protect", [False, True])
def test_metrics_and_docs_behind_the_key_only_when_asked(tiny_server, protect):
    from jpaged.entrypoints.openai.api_server import create_app
    from jpaged.entrypoints.openai.launcher import ServerHandle
    app = create_app(tiny_server.engine, "tiny", api_key="sekret", protect_metrics_and_docs=protect)
    with ServerHandle(app, tiny_server.engine, own_engine=False) as h:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert httpx.get(h.url + path).status_code == (401 if protect else 200), path
            keyed = httpx.get(h.url + path, headers={"Authorization": "Bearer sekret"})
            assert keyed.status_code == 200, path
        for probe in ("/health", "/ready"):  # orchestrators' probes carry no key
            assert httpx.get(h.url + probe).status_code == 200


# ---- metrics, tokenize, health ---------------------------------------------------------------


def test_metrics_parse_and_move(tiny_server, client):
    before = metric_values(tiny_server.url)
    client.completions.create(model="tiny", prompt="count me", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    after = metric_values(tiny_server.url)
    for name in ("jpaged:num_requests_running", "jpaged:num_requests_waiting",
                 "jpaged:num_requests_swapped", "jpaged:kv_cache_usage_perc",
                 "jpaged:prefix_cache_hit_rate", "jpaged:num_preemptions_total"):
        assert name in after
    assert after["jpaged:generation_tokens_total"] >= before.get("jpaged:generation_tokens_total", 0) + 5
    assert after["jpaged:time_to_first_token_seconds_count"] > before.get(
        "jpaged:time_to_first_token_seconds_count", 0)
    assert after["jpaged:time_per_output_token_seconds_count"] > before.get(
        "jpaged:time_per_output_token_seconds_count", 0)
    key = "jpaged:request_success_total{length}"
    assert after[key] > before.get(key, 0)


def test_tokenize_detokenize_models_health(tiny_server, client):
    url = tiny_server.url
    r = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == 128
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Hello world"
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 3
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == 128
    assert httpx.get(url + "/health").status_code == 200
    assert "/v1/completions" in httpx.get(url + "/openapi.json").json()["paths"]


def test_ready_waits_for_warmup_health_does_not(tiny_text_model):
    """During warm-up /health says the engine lives (200) and /ready says 503; a request sent
    meanwhile waits and is then served; /ready turns 200 once every executable is built, and
    the tiny server's warm-up left nothing for requests to compile."""
    from helpers import TINY_SERVER_ARGS
    from jpaged import LLM
    from jpaged.entrypoints.openai.api_server import create_app
    from jpaged.entrypoints.openai.launcher import ServerHandle
    from jpaged.engine.async_engine import AsyncEngine
    llm = LLM(tiny_text_model, **TINY_SERVER_ARGS)
    gate, warmup = threading.Event(), llm.warmup
    llm.warmup = lambda **kw: (gate.wait(60), warmup(**kw))[1]
    engine = AsyncEngine(llm, warmup=True)
    with ServerHandle(create_app(engine, "tiny"), engine) as h:
        assert httpx.get(h.url + "/health").status_code == 200
        r = httpx.get(h.url + "/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_warming_up"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            early = pool.submit(httpx.post, h.url + "/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": "early", "max_tokens": 3, "temperature": 0.5,
                "top_p": 0.9, "logprobs": 2, "ignore_eos": True})
            time.sleep(0.5)
            assert not early.done()
            gate.set()
            assert early.result().status_code == 200
            assert early.result().json()["usage"]["completion_tokens"] == 3
        assert engine.ready.is_set() and httpx.get(h.url + "/ready").status_code == 200
        assert engine.warmup_s is not None
        assert len(llm.runner.executables) == len(llm.runner.executables_needed())


# ---- soak (briefly; scripts/soak.py runs the full 1,000) -------------------------------------


def test_soak_brief(tiny_server):
    spec = importlib.util.spec_from_file_location(
        "soak", pathlib.Path(__file__).parents[2] / "scripts" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    report = asyncio.run(soak.run_soak(tiny_server.url, num_requests=100, concurrency=16,
                                       abort_fraction=0.1, max_tokens=24, seed=1, timeout=60))
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["wrong"] == 0, report
    assert report["aborted"] >= 5 and report["completed"] + report["aborted"] == 100
    assert_pool_free(tiny_server)


def test_default_model_name(tiny_server):
    """The name a server reports when not told one: the model path's stem (a folder's name),
    the embedded model's own name, "model" for an in-memory model."""
    import dataclasses
    from jpaged.models.loader import resolve_model_path
    from jpaged.entrypoints.openai.config import DEFAULT_MODEL_NAME
    from jpaged.entrypoints.openai.launcher import default_model_name
    from jpaged.runner.model_loader import is_default_model
    info = tiny_server.engine.info
    assert default_model_name(info) == "tiny"
    assert is_default_model(str(resolve_model_path(None)))
    assert not is_default_model(info.model_path) and not info.is_default_model
    assert default_model_name(dataclasses.replace(info, is_default_model=True)) == DEFAULT_MODEL_NAME
    assert default_model_name(dataclasses.replace(info, model_path=None)) == "model"
