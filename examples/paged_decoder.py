"""A decoder of your own on jpaged's paged KV cache, without the engine.

A tiny random-weight transformer (RMSNorm, RoPE, grouped-query attention, a GELU MLP) in
plain JAX. It prefills a batch of prompts of different lengths in one ragged step, then
decodes a few tokens greedily, all under `jax.jit`, with its K/V in a `jpaged.PagedKVCache`;
then runs the same decoder with plain dense causal attention over the whole sequences and
prints the largest difference of their logits.

    python examples/paged_decoder.py [--backend auto|cpu|xla|reference|pallas|pallas-interpret]
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpaged import PagedKVCache

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 64, 2, 4, 2, 16, 128


def init_params(seed: int = 0) -> dict:
    """Random weights; per-layer weights stacked on a leading [LAYERS] axis."""
    shapes = {"embed": (VOCAB, DIM), "wq": (LAYERS, DIM, HEADS * HEAD_DIM),
              "wk": (LAYERS, DIM, KV_HEADS * HEAD_DIM), "wv": (LAYERS, DIM, KV_HEADS * HEAD_DIM),
              "wo": (LAYERS, HEADS * HEAD_DIM, DIM), "w_up": (LAYERS, DIM, FFN),
              "w_down": (LAYERS, FFN, DIM), "lm_head": (DIM, VOCAB)}
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    params = {name: jax.random.normal(key, shape) / np.sqrt(shape[-2] if len(shape) > 2 else shape[0])
              for key, (name, shape) in zip(keys, shapes.items())}
    params["embed"] = params["embed"] * np.sqrt(DIM)
    return params


def rms_norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def rope(x, positions):
    """Rotary embedding of x [tokens, heads, HEAD_DIM] at positions [tokens]."""
    freqs = 1.0 / 10000 ** (jnp.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angle = positions[:, None, None] * freqs  # [tokens, 1, HEAD_DIM / 2]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle),
                            x1 * jnp.sin(angle) + x2 * jnp.cos(angle)], axis=-1)


def qkv(params, layer, x, positions):
    """x [tokens, DIM] -> q [tokens, HEADS, HEAD_DIM], k and v [tokens, KV_HEADS, HEAD_DIM]."""
    h = rms_norm(x)
    q = (h @ params["wq"][layer]).reshape(-1, HEADS, HEAD_DIM)
    k = (h @ params["wk"][layer]).reshape(-1, KV_HEADS, HEAD_DIM)
    v = (h @ params["wv"][layer]).reshape(-1, KV_HEADS, HEAD_DIM)
    return rope(q, positions), rope(k, positions), v


def finish_layer(params, layer, x, attn):
    """The residual stream after attention's output [tokens, HEADS, HEAD_DIM] and the MLP."""
    x = x + attn.reshape(x.shape[0], -1) @ params["wo"][layer]
    return x + jax.nn.gelu(rms_norm(x) @ params["w_up"][layer]) @ params["w_down"][layer]


# ---- the decoder on the paged cache ------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="num_tokens", donate_argnames="cache")
def paged_step(params, cache: PagedKVCache, tokens, query_lens, num_tokens=None):
    """One step: tokens [N] packed as `cache.append` says (num_tokens=None: decode, one row
    per sequence) -> (cache, logits [N, VOCAB])."""
    cache, meta = cache.append(query_lens, num_tokens)
    x = params["embed"][tokens]
    for layer in range(LAYERS):
        q, k, v = qkv(params, layer, x, meta.positions)
        cache = cache.write(layer, k, v, meta)  # this step's K/V first: tokens see themselves
        x = finish_layer(params, layer, x, cache.attend(layer, q, meta))
    return cache, rms_norm(x) @ params["lm_head"]


def generate_paged(params, prompts, new_tokens: int, backend: str, block_size: int):
    """Greedy tokens [B, new_tokens] and the logits [B, new_tokens, VOCAB] they came from."""
    B, lens = len(prompts), np.array([len(p) for p in prompts])
    cache = PagedKVCache.create(num_layers=LAYERS, num_blocks=64, block_size=block_size,
                                num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_seqs=B,
                                max_blocks_per_seq=-(-(lens.max() + new_tokens) // block_size),
                                backend=backend)
    # Prefill: every prompt in one ragged step, padded to a power of two of tokens.
    num_tokens = 1 << int(lens.sum() - 1).bit_length()
    tokens = np.zeros(num_tokens, np.int32)
    tokens[:lens.sum()] = np.concatenate(prompts)
    cache = cache.allocate(lens)  # on the host: blocks for the prompts
    cache, logits = paged_step(params, cache, tokens, lens, num_tokens=num_tokens)
    step_logits = [logits[np.cumsum(lens) - 1]]  # each prompt's last token
    for _ in range(new_tokens - 1):  # decode: one token per sequence, row b = sequence b
        cache = cache.allocate(np.ones(B, np.int32))
        cache, logits = paged_step(params, cache, step_logits[-1].argmax(-1), np.ones(B, np.int32))
        step_logits.append(logits)
    logits = np.stack(step_logits, axis=1)
    return logits.argmax(-1), logits


# ---- the same decoder with dense attention ------------------------------------------------------

@jax.jit
def dense_logits(params, tokens):
    """tokens [B, T] (right-padded) -> logits [B, T, VOCAB], plain causal attention."""
    B, T = tokens.shape
    x = params["embed"][tokens.reshape(-1)]
    positions = jnp.tile(jnp.arange(T), B)
    causal = jnp.tril(jnp.ones((T, T), bool))
    for layer in range(LAYERS):
        q, k, v = (a.reshape(B, T, -1, HEAD_DIM) for a in qkv(params, layer, x, positions))
        k, v = (jnp.repeat(a, HEADS // KV_HEADS, axis=2) for a in (k, v))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM)
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        x = finish_layer(params, layer, x, jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(B * T, HEADS, HEAD_DIM))
    return (rms_norm(x) @ params["lm_head"]).reshape(B, T, VOCAB)


def main(prompt_lens=(5, 12, 3, 9), new_tokens: int = 6, backend: str = "auto",
         block_size: int = 4, verbose: bool = True) -> dict:
    params = init_params()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(VOCAB, size=n).astype(np.int32) for n in prompt_lens]
    tokens, logits = generate_paged(params, prompts, new_tokens, backend, block_size)

    # Dense: each whole sequence (prompt + the tokens fed back), logits at the same positions.
    T = max(prompt_lens) + new_tokens
    full = np.zeros((len(prompts), T), np.int32)
    want = np.zeros_like(logits)
    for b, p in enumerate(prompts):
        full[b, :len(p) + new_tokens - 1] = np.concatenate([p, tokens[b, :-1]])
    dense = np.asarray(dense_logits(params, full))
    for b, p in enumerate(prompts):
        want[b] = dense[b, len(p) - 1:len(p) - 1 + new_tokens]
    diff = float(np.abs(logits - want).max())
    if verbose:
        print(f"prompts of {list(prompt_lens)} tokens, {new_tokens} new tokens each, "
              f"backend {backend!r}, block_size {block_size}")
        for b, t in enumerate(tokens):
            print(f"  sequence {b}: {t.tolist()}")
        print(f"max |paged - dense| logit difference: {diff:.2e}")
    return {"max_abs_diff": diff, "paged_tokens": tokens.tolist(),
            "dense_tokens": want.argmax(-1).tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=6)
    args = parser.parse_args()
    main(new_tokens=args.new_tokens, backend=args.backend, block_size=args.block_size)
