"""OPT decoder in Flax (Meta's OPT, the model family of the vLLM paper: OPT-125M ... 175B).

Built like `models/llama.py`, whose dense layers, embeddings, layer loop (unrolled or
`scan_layers`), weight packing and tensor-parallel layout it shares: q/k/v fused as
`qkv_proj` (MHA), the KV pool threaded through the layers, each layer writing its K/V
before it reads. OPT's own parts: learned positions (row `position + 2`, HF's offset),
LayerNorm with bias before each block (`do_layer_norm_before`; after it for OPT-350M,
which then has no final norm), a ReLU MLP (`fc1`, `fc2`), biases on every projection,
the head tied to the token embeddings, and `project_in` / `project_out` where the
embeddings are narrower than the model (`word_embed_proj_dim`). Param tree and HF names:
`models/loader.py`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ModelConfig
from .llama import Embedding, Linear, run_layers

POSITION_OFFSET = 2  # HF `OPTLearnedPositionalEmbedding`: position p reads row p + 2
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which HF's OPT uses


class LayerNorm(nn.Module):
    """LayerNorm in float32 with a two-pass variance, as torch computes it."""
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class OPTDecoderLayer(nn.Module):
    config: ModelConfig
    backend: Any
    param_dtype: Any = jnp.float32
    scanned: bool = False  # under nn.scan: return (carry, None)
    packed: bool = False  # dense kernels packed (`llama.pack_params`)
    tensor_parallel: int = 1  # `qkv_proj` columns grouped per device (`llama.DecoderLayer`)

    @nn.compact
    def __call__(self, carry, layer, meta):
        h, k_pool, v_pool = carry
        layer = jnp.int32(layer)
        c = self.config
        H, D, T = c.num_heads, c.head_dim, self.tensor_parallel
        N = h.shape[0]
        rows = meta.query_start_loc[-1]  # real tokens; the bucket's padding follows them
        dense = functools.partial(Linear, use_bias=c.attention_bias, param_dtype=self.param_dtype,
                                  packed=self.packed)
        attn_norm = LayerNorm(LAYER_NORM_EPS, self.param_dtype, name="attn_norm")
        mlp_norm = LayerNorm(LAYER_NORM_EPS, self.param_dtype, name="mlp_norm")
        pre = c.do_layer_norm_before

        x = attn_norm(h) if pre else h
        Hd = H // T * D  # one device's q (and k, and v) columns
        qkv = dense(3 * H * D, name="qkv_proj")(x, rows).reshape(N, T, -1)
        q = qkv[..., :Hd].reshape(N, H, D)
        k = qkv[..., Hd:2 * Hd].reshape(N, H, D)
        v = qkv[..., 2 * Hd:].reshape(N, H, D)
        k_pool, v_pool = self.backend.write(k_pool, v_pool, layer, k, v, meta.slot_mapping)
        attn = self.backend.attend(q, k_pool, v_pool, layer, meta, scale=D ** -0.5)
        h = h + dense(c.hidden_size, name="o_proj")(attn.reshape(N, H * D), rows)
        if not pre:
            h = attn_norm(h)

        x = mlp_norm(h) if pre else h
        x = nn.relu(dense(c.intermediate_size, name="fc1")(x, rows))
        h = h + dense(c.hidden_size, name="fc2")(x, rows)
        if not pre:
            h = mlp_norm(h)
        return ((h, k_pool, v_pool), None) if self.scanned else (h, k_pool, v_pool)


class OPTForCausalLM(nn.Module):
    """__call__(token_ids [N], positions [N], kv_pool (k, v), meta, logits_index [B])
    -> (logits f32[B, vocab] at the sampled positions, updated kv_pool); the fields,
    `return_hidden` and `head_logits` are `LlamaForCausalLM`'s."""
    config: ModelConfig
    backend: Any
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    packed_weights: bool = False
    tensor_parallel: int = 1

    @nn.compact
    def __call__(self, token_ids, positions, kv_pool, meta, logits_index, return_hidden=False):
        c = self.config
        if c.num_kv_heads != c.num_heads:
            raise ValueError(f"OPT is multi-head attention: num_kv_heads ({c.num_kv_heads}) "
                             f"must equal num_heads ({c.num_heads})")
        E = c.word_embed_proj_dim or c.hidden_size
        pd, packed = self.param_dtype, self.packed_weights
        rows = meta.query_start_loc[-1]
        embed = Embedding(c.vocab_size, E, pd, packed and c.tie_word_embeddings, name="embed_tokens")
        h = embed(token_ids).astype(jnp.float32)
        if c.word_embed_proj_dim:
            h = Linear(c.hidden_size, False, pd, packed, name="project_in")(h, rows)
        h = h + Embedding(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, pd,
                          name="embed_positions")(positions + POSITION_OFFSET).astype(jnp.float32)
        hidden, k_pool, v_pool = run_layers(self, OPTDecoderLayer, (h, *kv_pool), meta)
        h = hidden[logits_index]
        # Sampled rows: the real sequences come first; padding ones have no context.
        num_seqs = jnp.sum(meta.context_lens > 0, dtype=jnp.int32)
        if c.do_layer_norm_before:
            h = LayerNorm(LAYER_NORM_EPS, pd, name="norm")(h)
        if c.word_embed_proj_dim:
            h = Linear(E, False, pd, packed, name="project_out")(h, num_seqs)
        if c.tie_word_embeddings:
            logits = embed.attend(h, num_seqs)
        else:
            logits = Linear(c.vocab_size, False, pd, packed, name="lm_head")(h, num_seqs)
        return (logits, hidden) if return_hidden else logits, (k_pool, v_pool)

    @nn.nowrap
    def head_logits(self, params, hidden, num_rows=None):
        """`LlamaForCausalLM.head_logits`: the final norm (pre-norm models), project_out and
        the head on rows of the last layer's output."""
        c, pd, packed = self.config, self.param_dtype, self.packed_weights
        E = c.word_embed_proj_dim or c.hidden_size
        h = hidden
        if c.do_layer_norm_before:
            h = LayerNorm(LAYER_NORM_EPS, pd).apply({"params": params["norm"]}, h)
        if c.word_embed_proj_dim:
            h = Linear(E, False, pd, packed).apply({"params": params["project_out"]}, h, num_rows)
        if c.tie_word_embeddings:
            embed = Embedding(c.vocab_size, E, pd, packed)
            return embed.apply({"params": params["embed_tokens"]}, h, num_rows, method="attend")
        return Linear(c.vocab_size, False, pd, packed).apply({"params": params["lm_head"]}, h,
                                                             num_rows)
