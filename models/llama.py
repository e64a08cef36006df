"""Llama-family decoder in Flax (SmolLM2, Llama 2/3, Mistral, Qwen2).

By default the layers are unrolled, each with its own parameter arrays (`layers_0`,
`layers_1`, ...): under `nn.scan` over stacked weights, XLA (CPU and GPU alike)
copies every layer's weights out of the stack each step before its dots (a CPU
decode step 1.2-1.4x slower), at the price of a compile that grows with depth.
`scan_layers=True` runs them under `nn.scan` over weights stacked along a leading
layer axis (`layers`), so the traced step and its compile time do not grow with
depth: for deep models, or when start-up matters more than step time.
`stack_layers` / `unstack_layers` convert a param tree between the two layouts.
The KV pool is threaded through the layers and each layer writes its new K/V
before it reads (docs/design.md, "The in-place pool rule": the other orders copy
the pool). Weights may be bfloat16; every dot accumulates and returns float32,
the fast mixed-precision layout on the CPU, and activations stay float32.

Param tree: see `models/loader.py` (q/k/v fused as `qkv_proj`, gate/up fused
as `gate_up_proj`: fewer, larger dots). With `packed_weights=True` (the CPU
runner's default) dense kernels and a tied embedding are stored in panels
(`pack_params`) and multiply through `jpaged.ops.matmul` (docs/design.md,
"Dense layers on the CPU: packed weights").
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpaged.ops.matmul import (
    PANEL,
    embedding_lookup,
    pack,
    pack_rows,
    packable,
    packed_matmul,
)

from .config import ModelConfig

_init = nn.initializers.normal(0.02)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies in float32, computed as transformers does (so greedy tokens match)."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    scaling = config.rope_scaling
    if scaling and scaling[0] == "linear":
        inv = inv / np.float32(scaling[1])
    elif scaling and scaling[0] == "llama3":
        _, factor, low, high, old_len = scaling
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x, cos, sin):
    """x [N, heads, head_dim]; HF's rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * scale.astype(jnp.float32)


class Linear(nn.Module):
    features: int
    use_bias: bool = False
    param_dtype: Any = jnp.float32
    packed: bool = False  # kernel in panels, [features / PANEL, in, PANEL], where features allow

    @nn.compact
    def __call__(self, x, num_rows=None):
        """`num_rows`: how many leading rows of x are real (the rest is a bucket's padding,
        which the packed kernel skips, leaving zeros); None: all."""
        if self.packed and packable(self.features):
            kernel = self.param("kernel", _init, (self.features // PANEL, x.shape[-1], PANEL),
                                self.param_dtype)
            y = packed_matmul(x, kernel, num_rows=num_rows)
        else:
            kernel = self.param("kernel", _init, (x.shape[-1], self.features), self.param_dtype)
            y = jnp.dot(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        return y


class Embedding(nn.Module):
    """Token embeddings [V, hidden]; `packed`: stored as `pack_rows` packs them (where V
    allows), so that as the tied head (`attend`) they run through the packed matmul."""
    num_embeddings: int
    features: int
    param_dtype: Any = jnp.float32
    packed: bool = False

    def setup(self):
        V, D = self.num_embeddings, self.features
        shape = (V // PANEL, D, PANEL) if self._is_packed() else (V, D)
        self.embedding = self.param("embedding", _init, shape, self.param_dtype)

    def _is_packed(self) -> bool:
        return self.packed and packable(self.num_embeddings)

    def __call__(self, ids):
        return embedding_lookup(self.embedding, ids) if self._is_packed() else self.embedding[ids]

    def attend(self, h, num_rows=None):
        """h [B, hidden] -> f32 [B, V]: h times the embeddings' transpose (the tied head);
        `num_rows` as for `Linear`."""
        if self._is_packed():
            return packed_matmul(h, self.embedding, num_rows=num_rows)
        # Contract with the embedding as it lies: an explicit `.T` makes XLA's CPU backend
        # transpose the whole [vocab, hidden] matrix every step (4.8x slower in bf16).
        return jax.lax.dot_general(h.astype(self.embedding.dtype), self.embedding,
                                   (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


class DecoderLayer(nn.Module):
    config: ModelConfig
    backend: Any
    param_dtype: Any = jnp.float32
    scanned: bool = False  # under nn.scan: return (carry, None)
    packed: bool = False  # dense kernels packed (`pack_params`)
    # Devices the heads and MLP columns are split over: the fused columns come grouped per
    # device (`jpaged.runner.parallel.regroup_params`; at 1, the loader's own layout).
    tensor_parallel: int = 1

    @nn.compact
    def __call__(self, carry, layer, cos, sin, meta):
        h, k_pool, v_pool = carry
        layer = jnp.int32(layer)
        c = self.config
        H, KV, D = c.num_heads, c.num_kv_heads, c.head_dim
        N = h.shape[0]
        rows = meta.query_start_loc[-1]  # real tokens; the bucket's padding follows them
        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="attn_norm")(h)
        dense = functools.partial(Linear, param_dtype=self.param_dtype, packed=self.packed)
        T = self.tensor_parallel
        Hd, KVd = H // T * D, KV // T * D  # one device's q and k (or v) columns
        qkv = dense((H + 2 * KV) * D, c.attention_bias, name="qkv_proj")(x, rows).reshape(N, T, -1)
        q = apply_rope(qkv[..., :Hd].reshape(N, H, D), cos, sin)
        k = apply_rope(qkv[..., Hd:Hd + KVd].reshape(N, KV, D), cos, sin)
        v = qkv[..., Hd + KVd:].reshape(N, KV, D)
        k_pool, v_pool = self.backend.write(k_pool, v_pool, layer, k, v, meta.slot_mapping)
        attn = self.backend.attend(q, k_pool, v_pool, layer, meta, scale=D ** -0.5)
        h = h + dense(c.hidden_size, name="o_proj")(attn.reshape(N, H * D), rows)
        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="mlp_norm")(h)
        gate_up = dense(2 * c.intermediate_size, name="gate_up_proj")(x, rows).reshape(N, T, -1)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        h = h + dense(c.hidden_size, name="down_proj")((nn.silu(gate) * up).reshape(N, -1), rows)
        return ((h, k_pool, v_pool), None) if self.scanned else (h, k_pool, v_pool)


def run_layers(model: nn.Module, layer_cls, carry, *args):
    """The model's `config.num_layers` layers of `layer_cls` (each called as
    `layer(carry, index, *args)`, built with the model's backend, dtype, packing and
    tensor_parallel) over `carry`: unrolled (`layers_0` ...) or, with `model.scan_layers`,
    under `nn.scan` (`layers`), the two layouts `stack_layers` converts between. Called from
    the model's compact `__call__`, so that the layers are its submodules."""
    n = model.config.num_layers
    kwargs = dict(config=model.config, backend=model.backend, param_dtype=model.param_dtype,
                  packed=model.packed_weights, tensor_parallel=model.tensor_parallel)
    if model.scan_layers:
        layers = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0,) + (nn.broadcast,) * len(args), length=n)
        carry, _ = layers(**kwargs, scanned=True, name="layers")(
            carry, jnp.arange(n, dtype=jnp.int32), *args)
        return carry
    for i in range(n):
        carry = layer_cls(**kwargs, name=f"layers_{i}")(carry, i, *args)
    return carry


# Top-level params `head_logits` reads (of the Llama family and of OPT)
HEAD_PARAMS = ("norm", "embed_tokens", "lm_head", "project_out")


class LlamaForCausalLM(nn.Module):
    """__call__(token_ids [N], positions [N], kv_pool (k, v), meta, logits_index [B])
    -> (logits f32[B, vocab] at the sampled positions, updated kv_pool); with
    `return_hidden=True` the first is (logits, the last layer's output f32[N, hidden] for
    every packed token), which `head_logits` turns into logits (prompt logprobs)."""
    config: ModelConfig
    backend: Any
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    packed_weights: bool = False  # params as `pack_params` made them (the CPU runner's choice)
    tensor_parallel: int = 1  # devices the layers are split over (`DecoderLayer`)

    @nn.compact
    def __call__(self, token_ids, positions, kv_pool, meta, logits_index, return_hidden=False):
        c = self.config
        embed = Embedding(c.vocab_size, c.hidden_size, self.param_dtype,
                          self.packed_weights and c.tie_word_embeddings, name="embed_tokens")
        h = embed(token_ids).astype(jnp.float32)
        freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(c))[None, :]
        freqs = jnp.concatenate([freqs, freqs], axis=-1)
        # Once per step: computed inline, XLA fuses cos and sin into every layer's RoPE and
        # evaluates them per head and layer (on the CPU 4% of a 64-row decode step). A
        # conditional's result is materialized, and both branches are the same.
        tables = lambda f: (jnp.cos(f), jnp.sin(f))  # noqa: E731
        cos, sin = jax.lax.cond(positions[0] >= 0, tables, tables, freqs)
        hidden, k_pool, v_pool = run_layers(self, DecoderLayer, (h, *kv_pool), cos, sin, meta)
        h = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(hidden[logits_index])
        # Sampled rows: the real sequences come first; padding ones have no context.
        num_seqs = jnp.sum(meta.context_lens > 0, dtype=jnp.int32)
        if c.tie_word_embeddings:
            logits = embed.attend(h, num_seqs)
        else:
            logits = Linear(c.vocab_size, False, self.param_dtype, self.packed_weights, name="lm_head")(
                h, num_seqs)
        return (logits, hidden) if return_hidden else logits, (k_pool, v_pool)

    @nn.nowrap
    def head_logits(self, params, hidden, num_rows=None):
        """The final norm and the head (as `__call__` ends) on rows of the last layer's output
        hidden f32[M, hidden] -> logits f32[M, vocab]; reads only `params`' head entries
        (`HEAD_PARAMS`); `num_rows`: the real leading rows, as for `Linear`."""
        c, pd = self.config, self.param_dtype
        h = RMSNorm(c.rms_norm_eps, pd).apply({"params": params["norm"]}, hidden)
        if c.tie_word_embeddings:
            embed = Embedding(c.vocab_size, c.hidden_size, pd, self.packed_weights)
            return embed.apply({"params": params["embed_tokens"]}, h, num_rows, method="attend")
        return Linear(c.vocab_size, False, pd, self.packed_weights).apply(
            {"params": params["lm_head"]}, h, num_rows)


def pack_params(params: dict, config: ModelConfig) -> dict:
    """Params for `packed_weights=True`: every dense kernel [..., K, N] whose N is `packable`
    packed into panels (`jpaged.ops.matmul.pack`), and a tied embedding [V, K] by
    `pack_rows`; stacked layers keep their leading axis. Returns a new tree."""
    def visit(tree, path):
        out = {}
        for name, x in tree.items():
            if isinstance(x, dict):
                out[name] = visit(x, path + (name,))
            elif name == "kernel" and x.ndim >= 2 and packable(x.shape[-1]):
                out[name] = pack(x)
            elif path == ("embed_tokens",) and name == "embedding" and config.tie_word_embeddings \
                    and packable(x.shape[0]):
                out[name] = pack_rows(x)
            else:
                out[name] = x
        return out
    return visit(params, ())


def stack_layers(params: dict, num_layers: int) -> dict:
    """Per-layer params (`layers_0` ...) -> one `layers` tree with a leading layer axis (the
    `scan_layers=True` layout). The layers' weights exist twice until the input tree is dropped."""
    if "layers" in params:
        return params
    params = dict(params)
    per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]

    def stack(*xs):
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)
    params["layers"] = jax.tree_util.tree_map(stack, *per_layer)
    return params


def unstack_layers(params: dict, num_layers: int) -> dict:
    """The inverse of `stack_layers`: a stacked `layers` tree -> `layers_0` ... `layers_{L-1}`."""
    if "layers" not in params:
        return params
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return params
