"""Tests for jpaged.sampler: on-device sampling (greedy, temperature, filters, penalties,
seeding, logprobs)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jpaged.runner import sampler
from jpaged.runner.sampler import sample
from jpaged.runner.sampling_tensors import SamplerMode, SamplingTensors

FULL = SamplerMode(use_penalties=True, num_logprobs=4)


def _run(logits, t, mode, cfg):
    """sample() traced with (CANDIDATES, BLOCK) = cfg, to reach every code path at small V."""
    old = sampler.CANDIDATES, sampler.BLOCK
    sampler.CANDIDATES, sampler.BLOCK = cfg
    try:
        return sample(logits, t, mode)
    finally:
        sampler.CANDIDATES, sampler.BLOCK = old


run = jax.jit(_run, static_argnums=(2, 3))


def tensors(B, V, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, pres=0.0, freq=0.0,
            seed=None, step=0, counts=None, prompt=None):
    col = lambda v, dt: jnp.asarray(np.broadcast_to(np.asarray(v, dt), (B,)))
    return SamplingTensors(
        col(temperature, np.float32), col(top_k, np.int32), col(top_p, np.float32),
        col(min_p, np.float32), col(rep, np.float32), col(pres, np.float32), col(freq, np.float32),
        col(np.arange(B) if seed is None else seed, np.uint32), col(step, np.int32),
        None if counts is None else jnp.asarray(counts, jnp.float32),
        None if prompt is None else jnp.asarray(prompt, bool))


def np_penalize(logits, counts, prompt, rep, pres, freq):
    out = logits.astype(np.float64).copy()
    seen = (counts > 0) | prompt
    r = rep[:, None]
    out = np.where(seen, np.where(out > 0, out / r, out * r), out)
    return out - freq[:, None] * counts - pres[:, None] * (counts > 0)


def np_keep(s, k, p, min_p, slack=0.0):
    """Reference kept set for one row of scaled logits (ties at a cut-off kept). slack>0
    makes it more permissive, to absorb float32 rounding in the sampler."""
    s = s.astype(np.float64)
    keep = np.isfinite(s)
    if 0 < k < len(s):
        keep &= s >= np.sort(s)[::-1][k - 1]
    if p < 1:
        q = np.where(keep, np.exp(s - s.max()), 0.0)
        q /= q.sum()
        order = np.argsort(-s, kind="stable")
        excl = np.cumsum(q[order]) - q[order]
        kept = order[excl < p + slack]
        keep &= s >= (s[kept].min() if len(kept) else s.max())
    if min_p > 0:
        keep &= np.exp(s - s.max()) >= min_p * (1 - slack)
    keep[np.argmax(s)] = True
    return keep


CFG = (4, 64)  # (CANDIDATES, BLOCK): block top_k, rejection fallback, padded blocks at V=300
B, V = 8, 300


def test_greedy_is_argmax_and_logprobs_are_raw():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((B, V)).astype(np.float32) * 3
    logits[1, [5, 200]] = 50.0  # tie: first index wins
    out = run(jnp.asarray(logits), tensors(B, V), SamplerMode(False, 4), CFG)
    np.testing.assert_array_equal(out.token_ids, np.argmax(logits, -1))
    x = logits.astype(np.float64)
    ref = x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, ref[np.arange(B), out.token_ids], atol=1e-5)
    top = np.sort(ref, -1)[:, ::-1][:, :4]
    np.testing.assert_allclose(out.top_logprobs, top, atol=1e-5)
    assert np.all(np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0)
    np.testing.assert_allclose(np.take_along_axis(ref, np.asarray(out.top_ids), 1), top, atol=1e-5)


@pytest.mark.parametrize("filt", [{}, dict(top_k=3), dict(top_k=6, top_p=0.8),
                                  dict(top_p=0.7, min_p=0.05)])
def test_temperature_distribution_matches_softmax(filt):
    """Fast path (top_k=3 fits in 4 candidates), exact fallback (the others; top_k=6 also
    needs the radix select) and the unfiltered two-level draw match the filtered softmax."""
    n, T, R = 40, 0.7, 1024
    logits = np.linspace(-2.0, 2.0, n).astype(np.float32)[np.random.default_rng(0).permutation(n)]
    mode = SamplerMode(False, 0)
    draws = np.concatenate([np.asarray(run(jnp.asarray(np.tile(logits, (R, 1))),
                                           tensors(R, n, T, step=step, **filt), mode, (4, 16)).token_ids)
                            for step in range(4)])
    keep = np_keep(logits / T, filt.get("top_k", 0), filt.get("top_p", 1.0), filt.get("min_p", 0.0))
    p = np.where(keep, np.exp(logits / T - (logits / T).max()), 0.0)
    p /= p.sum()
    counts = np.bincount(draws, minlength=n)
    assert counts[~keep].sum() == 0
    expected = p[keep] * len(draws)
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = keep.sum() - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # wrong distributions give >> 100
    if filt:
        return
    # the untempered distribution must fail the same check
    p1 = np.exp(logits - logits.max())
    exp1 = p1 / p1.sum() * len(draws)
    assert ((counts - exp1) ** 2 / exp1).sum() > dof + 5 * np.sqrt(2 * dof)


row = st.fixed_dictionaries(dict(
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_k=st.sampled_from([0, -1, 1, 2, 3, 10, 50, 299, 300, 1000]),
    top_p=st.sampled_from([1.0, 1e-6, 0.1, 0.5, 0.9, 0.99]),
    min_p=st.sampled_from([0.0, 0.0, 0.01, 0.2, 0.9, 1.0])))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(row, min_size=8, max_size=8), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]), ties=st.booleans(),
       cfg=st.sampled_from([CFG, (512, 256)]))
def test_filters_never_return_filtered_tokens(rows, seed, scale, ties, cfg):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, V)) * scale).astype(np.float32)
    if ties:
        logits = np.round(logits * 2 / scale) * scale / 2
    logits[rng.random((B, V)) < 0.05] = -np.inf
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    out = run(jnp.asarray(logits), tensors(B, V, seed=rng.integers(0, 2**32, B), **cols),
              SamplerMode(False, 0), cfg)
    tok = np.asarray(out.token_ids)
    for b, r in enumerate(rows):
        if r["temperature"] == 0:
            assert tok[b] == np.argmax(logits[b])
            continue
        s = logits[b] / np.float32(r["temperature"])
        assert np_keep(s, r["top_k"], r["top_p"], r["min_p"], slack=1e-4)[tok[b]], (b, r)
        if r["top_k"] == 1 or r["top_p"] == 1e-6 or r["min_p"] == 1.0:
            assert logits[b, tok[b]] == logits[b].max()
    assert np.isfinite(np.asarray(out.logprobs)).all()


def test_penalties_match_reference():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((B, V)).astype(np.float32) * 3
    counts = rng.integers(0, 3, (B, V)) * (rng.random((B, V)) < 0.1)
    prompt = rng.random((B, V)) < 0.05
    rep, pres, freq = rng.uniform(0.5, 2, B), rng.uniform(-2, 2, B), rng.uniform(-2, 2, B)
    t = tensors(B, V, 0.0, rep=rep, pres=pres, freq=freq, counts=counts, prompt=prompt)
    ref = np_penalize(logits, counts, prompt, rep, pres, freq)
    np.testing.assert_allclose(sampler.apply_penalties(jnp.asarray(logits), t), ref, rtol=1e-5, atol=1e-5)
    out = run(jnp.asarray(logits), t, FULL, CFG)
    np.testing.assert_array_equal(out.token_ids, np.argmax(ref, -1))
    lsm = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))  # logprobs ignore penalties
    np.testing.assert_allclose(out.logprobs, lsm[np.arange(B), out.token_ids], atol=1e-5)


def test_same_seed_same_token_anywhere():
    """A request's token depends on its seed, step, logits and params only: not on its row,
    the other rows (some force the exact fallback) or the mode."""
    rng = np.random.default_rng(2)
    reqs = [dict(top_k=0, top_p=1.0), dict(top_k=3, top_p=0.9), dict(top_k=0, top_p=0.95)]
    req_logits = rng.standard_normal((3, V)).astype(np.float32)
    seen = [set() for _ in reqs]
    for trial, (mode, filters) in enumerate([(SamplerMode(False, 0), False), (FULL, True),
                                             (FULL, True), (SamplerMode(False, 0), True)]):
        n = 1 if not filters else 3
        rows = rng.permutation(B)[:n]
        logits = rng.standard_normal((B, V)).astype(np.float32)
        cols = dict(temperature=rng.uniform(0.5, 1.5, B), top_k=np.zeros(B, int), top_p=np.ones(B),
                    seed=rng.integers(0, 2**32, B), step=rng.integers(0, 9, B))
        if filters:
            cols["top_k"], cols["top_p"] = rng.integers(0, 30, B), rng.uniform(0.3, 1.0, B)
        for i, r in enumerate(rows):
            logits[r] = req_logits[i]
            cols["temperature"][r], cols["seed"][r], cols["step"][r] = 0.9, 1234 + i, 7
            cols["top_k"][r], cols["top_p"][r] = reqs[i]["top_k"], reqs[i]["top_p"]
        pen = dict(counts=np.zeros((B, V)), prompt=np.zeros((B, V), bool)) if mode.use_penalties else {}
        tok = np.asarray(run(jnp.asarray(logits), tensors(B, V, **cols, **pen), mode, CFG).token_ids)
        for i, r in enumerate(rows):
            seen[i].add(int(tok[r]))
    assert all(len(x) == 1 for x in seen), seen
    u = jax.jit(sampler._uniforms)(jnp.full((200,), 1234, jnp.uint32), jnp.arange(200))
    assert len(np.unique(np.asarray(u))) == 200 and np.all((np.asarray(u) > 0) & (np.asarray(u) <= 1))


def test_padding_rows_never_nan():
    rng = np.random.default_rng(3)
    logits = np.zeros((B, V), np.float32)
    logits[4:] = rng.standard_normal((4, V)) * 100
    logits[7, :] = -np.inf
    nan = np.nan
    t = tensors(B, V, temperature=[nan, -1, 0, 1e-30, 1e30, 1, 7, nan],
                top_k=[-5, 0, 10**9, 1, 2**31 - 1, -2**31, 3, 0],
                top_p=[0, -1, 2, nan, 1e-30, 0.5, 1, 0], min_p=[-1, 5, nan, 1, 0, 0.5, 2, 0],
                rep=[0, -1, nan, 1e30, 1e-30, 1, 2, 0], pres=[nan, 1e30, 0, 0, 1, 2, -2, 0],
                freq=[0, nan, 1e30, -1e30, 0, 1, 1, 0], seed=rng.integers(0, 2**32, B),
                step=[0, -1, 2**31 - 1, 5, 0, 0, 0, 0],
                counts=rng.integers(0, 2, (B, V)), prompt=rng.random((B, V)) < 0.5)
    out = run(jnp.asarray(logits), t, FULL, CFG)
    tok = np.asarray(out.token_ids)
    assert ((tok >= 0) & (tok < V)).all()
    assert not np.isnan(np.asarray(out.logprobs)[:7]).any()  # row 7 is all -inf
    assert not np.isnan(np.asarray(out.top_logprobs)[:7]).any()


def test_processed_logprobs_match_reference():
    """The values the draw used (penalties, then temperature and the filters; greedy rows
    penalties only), filtered tokens -inf, the sampled token always finite, over the
    candidate path and the exact (sorted) one. Rows in `raw_rows` (beam search) keep raw
    logprobs. (raw_logits and processed_logits: tests/engine/test_eval_outputs.py.)"""
    kind = "processed_logprobs"
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    T = np.array([0, 0.7, 1.3, 0.9, 1, 0.5, 1.0, 0.8])
    k = np.array([0, 0, 3, 0, 0, 3, 50, 2])  # 50: beyond the 4 candidates (the sort)
    p = np.array([1, 1, 1, 0.8, 1, 0.9, 0.95, 1])
    mp = np.array([0, 0, 0, 0, 0.1, 0.05, 0, 0.2])
    counts = rng.integers(0, 3, (B, V)) * (rng.random((B, V)) < 0.1)
    prompt = rng.random((B, V)) < 0.05
    rep, pres, freq = rng.uniform(0.8, 1.5, B), rng.uniform(-1, 1, B), rng.uniform(-1, 1, B)
    t = tensors(B, V, T, top_k=k, top_p=p, min_p=mp, rep=rep, pres=pres, freq=freq, counts=counts,
                prompt=prompt)
    raw_rows = np.zeros(B, bool)
    raw_rows[0] = True
    t = t._replace(raw_rows=jnp.asarray(raw_rows))
    out = run(jnp.asarray(logits), t, SamplerMode(True, 4, kind), CFG)
    pen = np_penalize(logits, counts, prompt, rep, pres, freq)
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lsm = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    for b in range(B):
        tok = int(out.token_ids[b])
        if b == 0:  # a raw row
            values = lsm[b]
        else:
            s = pen[b] / (T[b] if T[b] > 0 else 1.0)
            keep = np_keep(s, k[b], p[b], mp[b]) if T[b] > 0 else np.ones(V, bool)
            assert keep[tok], b
            values = np.where(keep, s, -np.inf)
            values = values - (s[keep].max() + np.log(np.exp(s[keep] - s[keep].max()).sum()))
        assert np.isfinite(out.logprobs[b])
        np.testing.assert_allclose(out.logprobs[b], values[tok], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out.top_logprobs[b], np.sort(values)[::-1][:4], rtol=1e-5, atol=1e-4)
