"""On-device token sampling, run inside the engine's jitted step (pure JAX, fixed shapes;
docs/design.md, "Sampling").

Semantics follow vLLM: penalties on the logits, then temperature, then top-k, top-p and
min-p filtering, then one categorical draw per row. Greedy rows (temperature < 1e-5) take
the argmax of the penalized logits and ignore the filters. Logprobs follow the mode's
`logprobs_mode` (vLLM's): raw_logprobs (log_softmax of the logits as the model produced
them), raw_logits, and processed_logprobs / processed_logits, the same after the processing
above (greedy rows: penalties only; filtered tokens -inf, the sampled token always finite).
`token_logprobs` gives prompt logprobs (always raw).

Randomness is one uniform per row from `fold_in(key(seed), step)`, so a request's tokens do
not depend on the batch it is in. The draw is an inverse CDF, done in two levels (blocks of
the vocabulary, then inside one block), which needs no sort and no per-token random numbers.

Filters are exact. Ties at a cut-off are all kept (top-k keeps every token equal to the k-th
largest value, as vLLM does; top-p keeps every token equal to the last one it needs). The
fast path looks only at the `CANDIDATES` largest logits per row (`lax.top_k`) and checks
that the filters cut inside them; if any row's kept set may reach beyond, the batch takes
an exact path over the whole vocabulary (rejection rounds, see `_sample_exact`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jpaged.sampling_params import GREEDY_EPS

from .sampling_tensors import PromptLogprobs, SamplerMode, SamplerOutput, SamplingTensors

CANDIDATES = 128    # rows whose filters keep at most this many tokens take the fast path
BLOCK = 256         # block length of the two-level inverse CDF
MAX_ROUNDS = 64     # cap on rejection rounds (then the row takes its top token)


def _clean(x, default):
    x = x.astype(jnp.float32)
    return jnp.where(jnp.isfinite(x), x, default)


def apply_penalties(logits, t: SamplingTensors):
    counts = t.output_counts.astype(jnp.float32)
    in_output = counts > 0
    rep = _clean(t.repetition_penalty, 1.0)
    rep = jnp.where(rep > 0, rep, 1.0)[:, None]
    seen = in_output | t.prompt_mask.astype(bool)
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = (logits - _clean(t.frequency_penalty, 0.0)[:, None] * counts
              - _clean(t.presence_penalty, 0.0)[:, None] * in_output.astype(jnp.float32))
    if t.banned is not None:  # EOS and stop tokens before min_tokens (vLLM's semantics)
        logits = jnp.where(t.banned, -jnp.inf, logits)
    return logits


def _blocked(x, bs, fill):
    """[B, V] -> [B, ceil(V / bs), bs], padding the tail with `fill`."""
    B, V = x.shape
    nb = -(-V // bs)
    return jnp.pad(x, ((0, 0), (0, nb * bs - V)), constant_values=fill).reshape(B, nb, bs)


def _first(hit):
    """Index of the first True along the last axis (n - 1 if none)."""
    n = hit.shape[-1]
    iota = lax.broadcasted_iota(jnp.int32, hit.shape, hit.ndim - 1)
    return jnp.min(jnp.where(hit, iota, n), axis=-1).clip(0, n - 1)


def _argmax(x):
    """(first index of the row maximum, the maximum), in two cheap block passes."""
    B, V = x.shape
    xb = _blocked(x, min(BLOCK, V), -jnp.inf)
    bmax = jnp.max(xb, axis=-1)
    m = jnp.max(bmax, axis=-1)
    j = _first(bmax == m[:, None])
    blk = jnp.take_along_axis(xb, j[:, None, None], 1)[:, 0]
    return jnp.minimum(j * xb.shape[2] + _first(blk == m[:, None]), V - 1), m


def _top_k(x, k):
    """lax.top_k(x, k) values and ids (exact values; ties may pick other ids), computed
    on the k blocks of 16 with the largest maxima instead of on the whole row."""
    B, V = x.shape
    if V < 64 * k:
        return lax.optimization_barrier(lax.top_k(x, k))
    xb = _blocked(x, 16, -jnp.inf)
    bi = lax.optimization_barrier(lax.top_k(jnp.max(xb, axis=-1), k))[1]
    cand = jnp.take_along_axis(xb, bi[:, :, None], 1).reshape(B, k * 16)
    v, i = lax.optimization_barrier(lax.top_k(cand, k))
    return v, jnp.minimum(jnp.take_along_axis(bi, i // 16, 1) * 16 + i % 16, V - 1)


def _pick(w, c, x):
    """First index whose cdf `c` reaches `x` among entries with weight `w` > 0."""
    return _first((c >= x[:, None]) & (w > 0))


def _draw(w, u):
    """Per row, an index drawn with probability proportional to w[B, V] >= 0, by inverse
    CDF in two levels (block sums, then inside one block); u in (0, 1]. Also returns the
    total weight. A row of zeros gives V - 1."""
    B, V = w.shape
    wb = _blocked(w, min(BLOCK, V), 0.0)
    bsum = jnp.sum(wb, axis=-1)
    bcdf = jnp.cumsum(bsum, axis=-1)
    x = u * bcdf[:, -1]
    j = _pick(bsum, bcdf, x)
    before = jnp.where(j > 0, jnp.take_along_axis(bcdf, (j - 1)[:, None], 1)[:, 0], 0.0)
    blk = jnp.take_along_axis(wb, j[:, None, None], 1)[:, 0]
    cdf = jnp.cumsum(blk, axis=-1)
    i = _pick(blk, cdf, jnp.clip(x - before, 0.0, cdf[:, -1]))
    return jnp.minimum(j * wb.shape[2] + i, V - 1), bcdf[:, -1]


def _uniforms(seed, step, attempt=0):
    """One u in (0, 1] per row from (seed, step); `attempt` > 0 for rejection redraws."""
    def one(s, n):
        key = jax.random.fold_in(jax.random.key(s), n)
        if not isinstance(attempt, int) or attempt:
            key = jax.random.fold_in(key, attempt)
        return jax.random.uniform(key, (), jnp.float32)
    return 1.0 - jax.vmap(one)(seed.astype(jnp.uint32), step.astype(jnp.uint32))


def _filter_params(t, V):
    k = t.top_k.astype(jnp.int32)
    k_on = (k > 0) & (k < V)
    p = jnp.clip(_clean(t.top_p, 1.0), 0.0, 1.0)
    return k_on, jnp.where(k_on, k, V), p, p < 1.0, _clean(t.min_p, 0.0)


def _sample_candidates(cs, ci, ms, z, u, t, V):
    """Filter + draw among the top `kb` scaled logits cs (descending, ids ci).

    ms: row max of the scaled logits; z: sum over the vocabulary of exp(s - ms).
    Returns (token, exact, top-k mass, k-th largest value, whether the top-k cut is inside)."""
    B, kb = cs.shape
    k_on, k, p, p_on, min_p = _filter_params(t, V)
    e = jnp.exp(cs - ms[:, None])
    kth = jnp.take_along_axis(cs, (jnp.minimum(k, kb) - 1)[:, None], 1)
    keep_k = cs >= kth
    k_inside = (k <= kb) & ((kb == V) | (cs[:, -1] < kth[:, 0]))
    ek = jnp.where(keep_k, e, 0.0)
    zk = jnp.where(k_on, jnp.sum(ek, axis=-1), z)
    ex = jnp.cumsum(ek, axis=-1) - ek
    first = lax.broadcasted_iota(jnp.int32, cs.shape, 1) == 0
    tau_p = jnp.min(jnp.where((ex < (p * zk)[:, None]) | first, cs, jnp.inf), axis=-1)
    keep = keep_k & ((cs >= tau_p[:, None]) | ~p_on[:, None]) & (e >= min_p[:, None]) | first
    exact = (kb == V) | (~keep[:, -1] & (k_inside | ~k_on | ~p_on))
    w = jnp.where(keep, e, 0.0)
    i = _pick(w, jnp.cumsum(w, axis=-1), u * jnp.sum(w, axis=-1))
    return jnp.take_along_axis(ci, i[:, None], 1)[:, 0], exact, zk, kth[:, 0], k_inside


def _okey(x):
    """Order-preserving map f32 -> u32."""
    b = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _radix_select(key, w, target):
    """Per row, the largest t with sum(w[key >= t]) >= target (w >= 0, target <= sum(w)):
    an exact search over the 32 key bits in three histogram (scatter-add) rounds."""
    B, V = key.shape
    prefix = jnp.zeros((B,), jnp.uint32)
    above = jnp.zeros((B,), jnp.float32)   # weight of keys above the current bucket
    for shift, bits in ((21, 11), (10, 11), (0, 10)):
        n = 1 << bits
        digit = ((key >> shift) & (n - 1)).astype(jnp.int32)
        wb = w if shift == 21 else jnp.where((key >> (shift + bits)) == prefix[:, None], w, 0.0)
        flat = (digit + (jnp.arange(B, dtype=jnp.int32) * n)[:, None]).reshape(-1)
        hist = jnp.zeros((B * n,), jnp.float32).at[flat].add(wb.reshape(-1)).reshape(B, n)
        suffix = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]   # weight of digits >= d
        ok = above[:, None] + suffix >= target[:, None]
        d = jnp.max(jnp.where(ok, lax.broadcasted_iota(jnp.int32, (B, n), 1), 0), axis=1)
        nxt = jnp.take_along_axis(suffix, jnp.minimum(d + 1, n - 1)[:, None], 1)[:, 0]
        above = above + jnp.where(d + 1 < n, nxt, 0.0)
        prefix = (prefix << bits) | d.astype(jnp.uint32)
    return prefix


def _sample_exact(s, ms, t, tok, done, zk, kth, k_inside, top_tok):
    """Exact filters over the whole vocabulary by rejection (FlashInfer's sort-free idea):
    a draw is kept if it passes the filters, else the row draws again among the tokens
    above the rejected one. The kept set is an upper set of the values, so it survives
    every cut, and the accepted token has the filtered distribution. One pass per round:
    the block sums of the next draw also give the top-p mass above the tested token.

    tok: first draws (unfiltered, or final where done); zk: top-k mass (if k_inside or k
    off); kth: k-th largest scaled logit (if k_inside); top_tok: taken by rows still
    rejected after MAX_ROUNDS."""
    B, V = s.shape
    k_on, k, p, p_on, min_p = _filter_params(t, V)
    e = jnp.exp(s - ms[:, None])
    tk = jnp.where(k_on & k_inside, kth, -jnp.inf)
    need_k = k_on & ~k_inside   # the k-th value is beyond the candidates (rare)

    def radix_k():
        key = _radix_select(_okey(s), jnp.ones_like(e), k.astype(jnp.float32))
        key = jnp.where(key >> 31 == 1, key ^ jnp.uint32(0x80000000), ~key)
        tk2 = jnp.where(need_k, lax.bitcast_convert_type(key, jnp.float32), tk)
        return tk2, jnp.where(need_k, jnp.sum(jnp.where(s >= tk2[:, None], e, 0.0), axis=-1), zk)
    tk, zk = lax.cond(jnp.any(need_k), radix_k, lambda: (tk, zk))
    tm = lax.cond(jnp.any(min_p > 0), lambda: jnp.min(jnp.where(  # min-p cut as a value
        e >= jnp.minimum(min_p, 1.0)[:, None], s, jnp.inf), axis=-1), lambda: jnp.full((B,), -jnp.inf))

    def body(c):
        r, tok, done = c
        sx = jnp.take_along_axis(s, tok[:, None], 1)[:, 0]
        lb = jnp.maximum(jnp.nextafter(sx, jnp.inf), jnp.maximum(tk, tm))
        new, above = _draw(jnp.where(s >= lb[:, None], e, 0.0), _uniforms(t.seed, t.step, r))
        ok = ((sx >= tk) & (sx >= tm) & ((above < p * zk) | ~p_on)) | (sx >= ms)
        return r + 1, jnp.where(done | ok, tok, new), done | ok

    r, tok, done = lax.while_loop(lambda c: (c[0] <= MAX_ROUNDS) & ~jnp.all(c[2]), body,
                                  (jnp.int32(1), tok, done))
    return jnp.where(done, tok, top_tok)


def _sample_rows(pen, m_pen, greedy, greedy_tok, temp, t: SamplingTensors):
    """Tokens of a batch where some row samples (greedy rows keep `greedy_tok`)."""
    V = pen.shape[1]
    u = _uniforms(t.seed, t.step)
    inv_t = 1.0 / jnp.where(greedy, 1.0, temp)
    s = pen * inv_t[:, None]
    ms = m_pen * inv_t
    ms = jnp.where(jnp.isfinite(ms), ms, 0.0)
    tokens, z = _draw(jnp.exp(s - ms[:, None]), u)
    k_on, _, _, p_on, min_p = _filter_params(t, V)
    filtered = ~greedy & (k_on | p_on | (min_p > 0))

    def with_filters():
        top = _top_k(pen, min(V, CANDIDATES))
        ftok, exact, zk, kth, k_inside = _sample_candidates(
            top[0] * inv_t[:, None], top[1], ms, z, u, t, V)
        done = exact | ~filtered    # rows not done restart from their unfiltered draw
        picked = jnp.where(filtered & exact, ftok, tokens)
        return lax.cond(jnp.all(done), lambda: picked, lambda: _sample_exact(
            s, ms, t, picked, done, zk, kth, k_inside, greedy_tok))

    tokens = lax.cond(jnp.any(filtered), with_filters, lambda: tokens)
    return jnp.where(greedy, greedy_tok, tokens)


def _threshold(srt, ms, z, t, V):
    """The smallest scaled logit the filters keep, per row, from the row's largest values
    `srt` f32[B, n] (descending; n = V: the whole row): the same cuts as the draw's (top-k
    keeps ties with its k-th value; top-p on the top-k mass, keeping ties; min-p against
    the most likely). ms: row max; z: sum over the vocabulary of exp(s - ms). Also whether
    the values decide it (the cut lies inside them)."""
    B, n = srt.shape
    k_on, k, p, p_on, min_p = _filter_params(t, V)
    e = jnp.exp(srt - ms[:, None])
    kth = jnp.take_along_axis(srt, (jnp.minimum(k, n) - 1)[:, None], 1)[:, 0]
    k_inside = (k <= n) & ((n == V) | (srt[:, -1] < kth))
    ek = jnp.where(srt >= kth[:, None], e, 0.0)
    zk = jnp.where(k_on, jnp.sum(ek, axis=-1), z)
    ex = jnp.cumsum(ek, axis=-1) - ek
    first = lax.broadcasted_iota(jnp.int32, srt.shape, 1) == 0
    tau_p = jnp.min(jnp.where((ex < (p * zk)[:, None]) | first, srt, jnp.inf), axis=-1)
    tm = jnp.min(jnp.where(e >= jnp.minimum(min_p, 1.0)[:, None], srt, jnp.inf), axis=-1)
    none = jnp.full((B,), -jnp.inf)
    thr = jnp.maximum(jnp.maximum(jnp.where(k_on, kth, none), jnp.where(p_on, tau_p, none)),
                      jnp.where(min_p > 0, tm, none))
    return thr, (n == V) | ((k_inside | ~k_on) & (thr > srt[:, -1]))


def _filter_cut(s, ms, filtered, t):
    """Per row, the smallest scaled logit s f32[B, V] the filters keep (-inf for rows not
    `filtered`): from the top CANDIDATES values when the cut lies inside them, else from the
    sorted row (exact either way)."""
    B, V = s.shape
    z = jnp.sum(jnp.exp(s - ms[:, None]), axis=-1)

    def cut():
        thr, exact = _threshold(_top_k(s, min(V, CANDIDATES))[0], ms, z, t, V)
        return lax.cond(jnp.all(exact | ~filtered), lambda: thr,
                        lambda: _threshold(-jnp.sort(-s, axis=-1), ms, z, t, V)[0])
    thr = lax.cond(jnp.any(filtered), cut, lambda: jnp.full((B,), -jnp.inf))
    return jnp.where(filtered, thr, -jnp.inf)


def _logprob_values(logits, lse, pen, m_pen, greedy, temp, tokens, t: SamplingTensors, mode):
    """What the logprobs are made of in `mode.logprobs_mode`: (values f32[B, V], norm f32[B]),
    a token's logprob being values - norm. The processed modes use the scaled logits the draw
    used (greedy rows: the penalized ones), filtered tokens -inf; the sampled token is always
    kept (the draw's candidate sums may round a cut-off differently by an ulp). Rows in
    `t.raw_rows` keep raw logprobs."""
    kind = mode.logprobs_mode
    if kind == "raw_logprobs":
        return logits, lse
    norm = jnp.zeros_like(lse)
    if kind == "raw_logits":
        values = logits
    else:
        V = logits.shape[1]
        inv_t = 1.0 / jnp.where(greedy, 1.0, temp)
        s = pen * inv_t[:, None]
        ms = m_pen * inv_t
        ms = jnp.where(jnp.isfinite(ms), ms, 0.0)
        k_on, _, _, p_on, min_p = _filter_params(t, V)
        thr = _filter_cut(s, ms, ~greedy & (k_on | p_on | (min_p > 0)), t)
        keep = (s >= thr[:, None]) | (lax.broadcasted_iota(jnp.int32, s.shape, 1) == tokens[:, None])
        values = jnp.where(keep, s, -jnp.inf)
        if kind == "processed_logprobs":
            norm = ms + jnp.log(jnp.sum(jnp.where(keep, jnp.exp(s - ms[:, None]), 0.0), axis=-1))
    if t.raw_rows is not None:
        raw = t.raw_rows.astype(bool)
        values = jnp.where(raw[:, None], logits, values)
        norm = jnp.where(raw, lse, norm)
    return values, norm


def sample(logits: jax.Array, t: SamplingTensors, mode: SamplerMode) -> SamplerOutput:
    """Sample one token per row of logits f32[B, V]; see the module docstring. Whether any
    row samples, and whether any filters, is decided at run time (`lax.cond`), so one
    executable per static `mode` serves greedy, sampled and filtered batches."""
    logits = logits.astype(jnp.float32)
    K = mode.num_logprobs
    temp = _clean(t.temperature, 0.0)
    greedy = temp < GREEDY_EPS
    pen = apply_penalties(logits, t) if mode.use_penalties else logits
    greedy_tok, m_pen = _argmax(pen)
    m = jnp.max(logits, axis=-1) if mode.use_penalties else m_pen
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[:, None]), axis=-1))
    tokens = lax.cond(jnp.all(greedy), lambda: greedy_tok,
                      lambda: _sample_rows(pen, m_pen, greedy, greedy_tok, temp, t))
    tokens = tokens.astype(jnp.int32)
    values, norm = _logprob_values(logits, lse, pen, m_pen, greedy, temp, tokens, t, mode)
    lp = jnp.take_along_axis(values, tokens[:, None], 1)[:, 0] - norm
    top_ids = top_lp = None
    if K:
        tv, top_ids = _top_k(values, K)
        top_lp = tv - norm[:, None]
    return SamplerOutput(tokens, lp, top_ids, top_lp)


def token_logprobs(logits: jax.Array, token_ids: jax.Array, num_logprobs: int) -> PromptLogprobs:
    """Raw logprobs of rows of logits f32[M, V] (prompt positions): of `token_ids` i32[M]
    (each row's next prompt token), with its rank, and the top `num_logprobs` (static)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    x = jnp.take_along_axis(logits, token_ids[:, None], 1)
    ranks = jnp.sum(logits >= x, axis=-1, dtype=jnp.int32)
    tv, top_ids = _top_k(logits, num_logprobs)
    return PromptLogprobs(x[:, 0] - lse, ranks, top_ids, tv - lse[:, None])
