"""PagedKVCache (the cache as a library) against plain dense causal attention: prefill of
prompts of different lengths, a chunked/mixed step, decode steps with an idle row, shuffled
blocks, GQA, on every backend; jit without retracing; the example decoder."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.attention import cpu as cpu_attention
from jpaged.attention.paged_kv_cache import PagedKVCache

ROOT = Path(__file__).resolve().parents[2]
L, KV, H, D, BS = 2, 2, 4, 16, 4  # GQA: 2 query heads per KV head; 4-token blocks

# (query_lens per sequence, N packed rows or None = decode); row 2 stays idle throughout.
STEPS = [([37, 11, 0, 3], 64),  # prefill, different lengths (37: two 32-query tiles)
         ([2, 1, 0, 6], 64),    # chunked / mixed: more tokens after cached ones (same shape)
         ([1, 1, 0, 1], None),  # decode
         ([1, 0, 0, 1], None)]  # decode with a finished row

BACKENDS = ["reference", "xla",
            pytest.param("cpu", marks=pytest.mark.skipif(
                cpu_attention.available() is not None,
                reason=f"the C++ kernel does not build here: {cpu_attention.available()}")),
            "pallas-interpret"]


def dense_causal(q, k, v):
    """q [T, H, D], k/v [T, KV, D] -> [T, H, D]: plain softmax attention, causal (numpy)."""
    k, v = (np.repeat(x, q.shape[1] // x.shape[1], axis=1) for x in (k, v))
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((len(q), len(q)), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


def make_step():
    """A jitted step of every layer: q [L, N, H, D], k/v [L, N, KV, D] -> (cache, [L, N, H, D]);
    `step.traces` counts its traces."""
    @functools.partial(jax.jit, static_argnames="num_tokens", donate_argnums=0)
    def step(cache, q, k, v, query_lens, num_tokens):
        step.traces += 1
        cache, meta = cache.append(query_lens, num_tokens)
        outs = []
        for layer in range(L):
            cache = cache.write(layer, k[layer], v[layer], meta)
            outs.append(cache.attend(layer, q[layer], meta))
        return cache, jnp.stack(outs)
    step.traces = 0
    return step


STEP = {}  # backend -> its step, compiled once per test session


def _run(backend, step=None):
    """Every step through the cache and the same attention dense over each sequence's
    whole history; returns (cache, max difference, traces of `step`)."""
    step = step or make_step()
    rng = np.random.default_rng(0)
    cache = PagedKVCache.create(L, num_blocks=32, block_size=BS, num_kv_heads=KV, head_dim=D,
                                max_seqs=4, max_blocks_per_seq=12, backend=backend)
    hist = [[np.zeros((0, H, D), np.float32), np.zeros((0, KV, D), np.float32),
             np.zeros((0, KV, D), np.float32)] for _ in range(L * 4)]  # (layer, seq): q, k, v
    traces, worst = step.traces, 0.0
    for query_lens, num_tokens in STEPS:
        cache = cache.allocate(query_lens, rng=rng)  # blocks in shuffled order
        N = num_tokens or 4
        q = rng.standard_normal((L, N, H, D), np.float32)
        k = rng.standard_normal((L, N, KV, D), np.float32)
        v = rng.standard_normal((L, N, KV, D), np.float32)
        cache, out = step(cache, q, k, v, jnp.asarray(query_lens), num_tokens)
        out = np.asarray(out)
        # Packed rows of each sequence's new tokens: row b in decode, else one after another.
        start = np.arange(4) if num_tokens is None else np.cumsum([0, *query_lens])
        padding = np.ones(N, bool)
        for b, n in enumerate(query_lens):
            rows = np.arange(start[b], start[b] + n)
            padding[rows] = False
            for layer in range(L):
                h = hist[layer * 4 + b]
                for i, x in enumerate((q, k, v)):
                    h[i] = np.concatenate([h[i], x[layer, rows]])
                if n:
                    ref = dense_causal(*h)[-n:]
                    worst = max(worst, float(np.abs(out[layer, rows] - ref).max()))
        assert not out[:, padding].any(), "padding rows give zeros"
    assert np.asarray(cache.context_lens).tolist() == [41, 13, 0, 11]
    return cache, worst, step.traces - traces


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_attend_equals_dense_causal(backend):
    cache, worst, traces = _run(backend, STEP.setdefault(backend, make_step()))
    assert worst < 2e-5, worst
    assert cache.backend.name == backend and traces == 2
    tables = np.asarray(cache.block_tables)
    assert (tables[2] == -1).all()
    held = tables[tables >= 0]
    assert len(set(held.tolist())) == held.size == 11 + 4 + 3  # blocks of 41, 13, 11 tokens
    assert not all((np.diff(t[t >= 0]) == 1).all() for t in tables[[0, 1, 3]])  # shuffled


def test_jit_does_not_retrace_for_the_same_shapes():
    """One ragged shape (steps 1 and 2) and one decode shape (steps 3 and 4): two traces,
    then none for a second run with new values (the cache's static fields compare equal)."""
    if "reference" not in STEP:
        assert _run("reference", STEP.setdefault("reference", make_step()))[2] == 2
    assert _run("reference", STEP["reference"])[2] == 0


def test_allocate_and_free_on_the_host():
    cache = PagedKVCache.create(1, num_blocks=6, block_size=4, num_kv_heads=1, head_dim=16,
                                max_seqs=2, max_blocks_per_seq=4, backend="reference")
    cache = cache.allocate([5, 4])
    assert np.asarray(cache.block_tables).tolist() == [[0, 1, -1, -1], [2, -1, -1, -1]]
    cache = dataclasses.replace(cache, context_lens=jnp.asarray([5, 4]))  # as append leaves it
    cache = cache.allocate([3, 1])  # 8 tokens fit in seq 0's two blocks; seq 1 needs a second
    assert np.asarray(cache.block_tables).tolist() == [[0, 1, -1, -1], [2, 3, -1, -1]]
    assert cache.free_blocks().tolist() == [4, 5]
    with pytest.raises(ValueError, match="pool is full"):
        cache.allocate([9, 9])  # 2 + 2 more blocks, 2 free
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        cache.allocate([0, 20])
    cache = cache.free([0])
    assert cache.free_blocks().tolist() == [0, 1, 4, 5]
    assert np.asarray(cache.context_lens).tolist() == [0, 4]
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda c: c.allocate([1, 1]))(cache)


def test_the_example_decoder_matches_dense_attention():
    spec = importlib.util.spec_from_file_location("paged_decoder", ROOT / "examples" / "paged_decoder.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(prompt_lens=(5, 12, 3), new_tokens=4, backend="auto", verbose=False)
    assert result["max_abs_diff"] < 1e-4
    assert result["paged_tokens"] == result["dense_tokens"]


def test_cpu_op_without_a_compiler_says_why(tmp_path, monkeypatch):
    from jpaged.exceptions import KernelBuildError
    monkeypatch.setenv("JPAGED_CACHE_DIR", str(tmp_path))  # nothing cached: must compile
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    for f in (cpu_attention.load, cpu_attention.available):
        f.cache_clear()
    try:
        q = jnp.zeros((1, 2, 16))
        pool = jnp.zeros((1, 1, 1, 4, 16))
        with pytest.raises(KernelBuildError, match="unavailable here.*no-such-compiler.*xla"):
            cpu_attention.paged_attention(q, pool, pool, 0, jnp.zeros((1, 1), jnp.int32),
                                          jnp.ones(1, jnp.int32), jnp.asarray([0, 1]), 0.25)
        with pytest.raises(KernelBuildError, match="no-such-compiler"):
            PagedKVCache.create(1, 4, 4, 1, 16, 1, 1, backend="cpu")
        if jax.default_backend() == "cpu":
            assert PagedKVCache.create(1, 4, 4, 1, 16, 1, 1).backend.name == "xla"
    finally:
        monkeypatch.undo()
        for f in (cpu_attention.load, cpu_attention.available):
            f.cache_clear()
