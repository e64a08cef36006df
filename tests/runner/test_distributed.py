"""Several processes, one JAX program (`num_processes`, `jpaged worker`): local processes
through jax.distributed on 127.0.0.1, one CPU device each (gloo collectives), with
tensor_parallel_size = the number of processes. Process 0 (`jpaged.LLM`) gives the same
tokens as one process; a worker that dies makes process 0 exit non-zero saying so, within a
bounded time, and a process 0 that dies ends its workers the same way. Workers wait for
process 0's next header in the coordination service's key-value store, renewing the wait
while it idles (a gloo collective gave up after 30 idle minutes)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import jpaged
from jpaged.config import EngineConfig

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1] + [(7 * i + 3) % 500 for i in range(40)], [1, 44, 45], [1, 44, 45, 46, 200]]
SHARED = [1] + list(range(100, 132))  # two full blocks, then a different tail each
ENGINE = dict(attention_backend="cpu", max_num_seqs=4, max_model_len=128, max_num_batched_tokens=16,
              kv_cache_memory=1 << 20, compilation_cache_dir="")

# The workload: chunked prefill (16-token steps), prefix caching, n > 1 and beam search.
WORKLOAD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jpaged
    from helpers import NoTokenizer

    def workload(llm):
        greedy = jpaged.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        out = [r.outputs[0].token_ids for r in llm.generate({prompts!r}, greedy, use_tqdm=False)]
        llm.generate([{shared!r} + [5]], greedy, use_tqdm=False)
        hit = llm.generate([{shared!r} + [6, 7]], greedy, use_tqdm=False)[0].outputs[0].token_ids
        two = llm.generate([{prompts!r}[1]], jpaged.SamplingParams(
            temperature=0, n=2, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
        beams = llm.beam_search([{{"prompt_token_ids": {prompts!r}[2]}}],
                                jpaged.BeamSearchParams(beam_width=2, max_tokens=6))[0]
        return dict(greedy=out, hit=hit, samples=[c.token_ids for c in two.outputs],
                    beams=[list(s.tokens) for s in beams.sequences],
                    hit_rate=llm.kv_cache_stats()["prefix_cache_hit_rate"])
""")

ENGINE_PROCESS = WORKLOAD + textwrap.dedent("""
    import time
    import jpaged.runner.distributed
    jpaged.runner.distributed.INLINE_BYTES = {inline_bytes!r}
    llm = jpaged.LLM({path!r}, tokenizer=NoTokenizer(), **{engine!r})
    time.sleep(1.5)  # idle: the worker renews its wait for the first header several times
    stats = llm.kv_cache_stats()
    result = workload(llm) if not {hold!r} else dict(greedy=llm.generate(
        [[1, 2, 3]], jpaged.SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids)
    result.update(pool_bytes=stats["pool_bytes"], pool_bytes_per_device=stats["pool_bytes_per_device"],
                  shard_heads=[s.data.shape[llm.runner.backend.head_axis]
                               for s in llm.runner.kv_pool[0].addressable_shards],
                  steps=llm.stats.steps)
    print("RESULTS" + json.dumps(result), flush=True)
    if {hold!r}:  # wait for the test to kill a worker, then step again
        print("HOLDING", flush=True)
        sys.stdin.readline()
        llm.generate([[1, 2, 3, 4]], jpaged.SamplingParams(max_tokens=2), use_tqdm=False)
""")

WORKER_PROCESS = textwrap.dedent("""
    import jpaged
    import jpaged.runner.distributed
    jpaged.runner.distributed.HEADER_POLL_MS = 300
    steps = jpaged.run_worker({path!r}, **{engine!r})  # the folder has no tokenizer: none needed
    print("WORKER STEPS", steps, flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(code: str, cwd) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=cwd, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def launch(tmp_path, path, num: int, hold: bool = False, inline_bytes: int = 1 << 20):
    """Process 0 and its workers on a fresh port: (engine, [workers])."""
    fmt = dict(tests=TESTS, prompts=PROMPTS, shared=SHARED, path=str(path), hold=hold,
               inline_bytes=inline_bytes)
    # the tests' processes share XLA's cache: the second test compiles nothing
    cache = str(path.parent / "xla-cache")
    common = dict(ENGINE, compilation_cache_dir=cache, tensor_parallel_size=num, num_processes=num,
                  coordinator_address=f"127.0.0.1:{free_port()}")
    engine = start(ENGINE_PROCESS.format(**fmt, engine=dict(common, process_id=0)), tmp_path)
    workers = [start(WORKER_PROCESS.format(**fmt, engine=dict(common, process_id=i)), tmp_path)
               for i in range(1, num)]
    return engine, workers


def read_results(proc) -> dict:
    for line in proc.stdout:
        if line.startswith("RESULTS"):
            return json.loads(line[len("RESULTS"):])
    proc.wait(60)
    raise AssertionError(f"no results (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")


def reference(path) -> dict:
    """The workload in this process: one process, one device."""
    from helpers import NoTokenizer
    scope: dict = {}
    exec(WORKLOAD.format(tests=TESTS, prompts=PROMPTS, shared=SHARED), scope)
    return scope["workload"](jpaged.LLM(str(path), tokenizer=NoTokenizer(), **ENGINE))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import build_tiny_hf
    path = tmp_path_factory.mktemp("distributed") / "tiny"
    build_tiny_hf("llama", path)  # 4 heads, 2 KV heads: one KV head per process
    return path


def test_config_checks_the_process_layout():
    with pytest.raises(ValueError, match="needs coordinator_address"):
        EngineConfig(num_processes=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 2"):
        EngineConfig(num_processes=2, process_id=2, coordinator_address="h:1", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must be a multiple of num_processes=2"):
        EngineConfig(num_processes=2, coordinator_address="h:1", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="a worker is process 1 to num_processes - 1"):
        jpaged.run_worker(None)


@pytest.mark.parametrize("converted", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_give_the_same_tokens_as_one(tmp_path, tiny, converted):
    """(Behind -m slow, also from a `jpaged convert`ed checkpoint, which each process
    restores straight into its own shards, and with every step's arrays broadcast after
    its message rather than in it.)"""
    path = tiny
    if converted:
        from jpaged.runner.checkpoint import convert
        path = tmp_path / "converted"
        convert(str(tiny), str(path))
    engine, (worker,) = launch(tmp_path, path, 2, inline_bytes=0 if converted else 1 << 20)
    try:
        result = read_results(engine)
        assert engine.wait(120) == 0, engine.stderr.read()[-3000:]
        assert worker.wait(60) == 0, worker.stderr.read()[-3000:]
    finally:
        for p in (engine, worker):
            p.kill()
    one = reference(tiny)
    for field in ("greedy", "hit", "samples", "beams"):
        assert result[field] == one[field], field
    assert result["hit_rate"] > 0
    # each process's device holds one of the 2 KV heads of every block, and only that
    assert result["pool_bytes_per_device"] * 2 == result["pool_bytes"]
    assert result["shard_heads"] == [1]
    # the worker ran every step process 0 ran
    assert f"WORKER STEPS {result['steps']}" in worker.stdout.read()


@pytest.mark.parametrize("victim", ["worker", "engine"])
def test_a_dead_process_ends_the_others_with_a_message(tmp_path, tiny, victim):
    """A killed worker: process 0's next step fails (gloo's closed connection) and it exits
    non-zero naming the cause. A killed process 0: the worker's pending broadcast fails, or
    the coordination service (which lived in process 0) ends it."""
    engine, (worker,) = launch(tmp_path, tiny, 2, hold=True)
    try:
        read_results(engine)
        assert engine.stdout.readline().startswith("HOLDING")
        dead, survivor = (worker, engine) if victim == "worker" else (engine, worker)
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        start_s = time.monotonic()
        if victim == "worker":
            engine.stdin.write("go\n")  # step again
            engine.stdin.flush()
        code = survivor.wait(90)
        took = time.monotonic() - start_s
        err = survivor.stderr.read()
    finally:
        for p in (engine, worker):
            p.kill()
    print(f"the {victim}'s death ended the other with exit code {code} after {took:.1f} s")
    assert code != 0 and took < 60, (code, took)
    if victim == "worker":  # our own exit, not JAX's abort at its shutdown barrier
        assert code == 1, err[-2000:]
    expected = ("a process of the JAX program is gone" if victim == "worker"
                else "(a process of the JAX program is gone|another task died)")
    assert re.search(expected, err), err[-2000:]


def test_processes_with_other_arguments_refuse_to_start(tmp_path, tiny):
    """A worker started with another KV pool size than process 0's: both stop at start,
    naming the rank that differs (the pool plans would not match)."""
    fmt = dict(tests=TESTS, prompts=PROMPTS, shared=SHARED, path=str(tiny), hold=False,
               inline_bytes=1 << 20)
    common = dict(ENGINE, compilation_cache_dir=str(tiny.parent / "xla-cache"), tensor_parallel_size=2,
                  num_processes=2, coordinator_address=f"127.0.0.1:{free_port()}")
    engine = start(ENGINE_PROCESS.format(**fmt, engine=dict(common, process_id=0)), tmp_path)
    worker = start(WORKER_PROCESS.format(**fmt, engine=dict(common, process_id=1,
                                                             kv_cache_memory=2 << 20)), tmp_path)
    try:
        codes = engine.wait(120), worker.wait(120)
        errors = engine.stderr.read(), worker.stderr.read()
    finally:
        for p in (engine, worker):
            p.kill()
    assert codes[0] != 0 and codes[1] != 0
    for err in errors:
        assert "processes [1] run other engine arguments or another model than process 0" in err, err[-2000:]


def tiny_with_tokenizer(path):
    """A random tiny Llama with the default model's tokenizer (and vocabulary), so the server
    can take text."""
    from helpers import build_tiny_hf
    from jpaged.models.loader import load_tokenizer, resolve_model_path
    tokenizer = load_tokenizer(resolve_model_path(None))
    build_tiny_hf("llama", path, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    return path


def cli(*args) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, "-m", "jpaged", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_jpaged_serve_with_a_worker_answers_the_openai_client(tmp_path):
    """`jpaged serve` as process 0 (its engine core process is) and `jpaged worker` as
    process 1: completions through the openai client, greedy tokens as one process's; the
    worker exits 0 when the server stops."""
    import openai
    path = tiny_with_tokenizer(tmp_path / "tiny")
    port, flags = free_port(), ["--model", str(path), "--tensor-parallel-size", "2", "--num-processes", "2",
                                "--coordinator-address", f"127.0.0.1:{free_port()}",
                                "--max-model-len", "256", "--kv-cache-memory", "4MiB",
                                "--compilation-cache-dir", ""]
    server = cli("serve", *flags, "--process-id", "0", "--port", str(port))
    worker = cli("worker", *flags, "--process-id", "1")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(1)
        got = client.completions.create(model=client.models.list().data[0].id, prompt="Hello there",
                                        max_tokens=8, temperature=0)
        server.send_signal(signal.SIGINT)
        assert server.wait(120) == 0
        assert worker.wait(60) == 0, worker.stdout.read()[-3000:]
    finally:
        for p in (server, worker):
            p.kill()
    one = jpaged.LLM(str(path), **ENGINE).generate(
        "Hello there", jpaged.SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert got.choices[0].text == one.outputs[0].text and got.usage.completion_tokens == 8


DEFAULT_MODEL = dict(max_num_seqs=4, max_model_len=1024, kv_cache_memory=64 << 20)
DEFAULT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primes."]


@pytest.mark.slow
def test_the_default_model_over_3_processes_gives_one_process_tokens(tmp_path):
    """9 query heads and 3 KV heads: one KV head per process; the workers through `jpaged
    worker`."""
    address = f"127.0.0.1:{free_port()}"
    flags = dict(DEFAULT_MODEL, tensor_parallel_size=3, num_processes=3, coordinator_address=address,
                 compilation_cache_dir="")
    code = textwrap.dedent(f"""
        import json, jpaged
        llm = jpaged.LLM(None, process_id=0, **{flags!r})
        outs = llm.generate({DEFAULT_PROMPTS!r}, jpaged.SamplingParams(temperature=0, max_tokens=32,
                            ignore_eos=True), use_tqdm=False)
        print("RESULTS" + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    """)
    engine = start(code, tmp_path)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    workers = [cli("worker", *argv, f"--process-id={i}") for i in (1, 2)]
    try:
        tokens = read_results(engine)
        assert engine.wait(120) == 0
        for w in workers:
            assert w.wait(60) == 0, w.stdout.read()[-3000:]
    finally:
        for p in (engine, *workers):
            p.kill()
    one = jpaged.LLM(None, compilation_cache_dir="", **DEFAULT_MODEL).generate(
        DEFAULT_PROMPTS, jpaged.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    assert tokens == [o.outputs[0].token_ids for o in one]
