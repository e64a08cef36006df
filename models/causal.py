"""A plain causal forward over the engine's own param tree, for training: `causal_forward`.

The serving modules (`LlamaForCausalLM`, `OPTForCausalLM`) run unchanged: they are cloned
with `DenseCausalBackend`, an attention "backend" whose `write` hands the layer's new K/V
through as the "pool" and whose `attend` is dense causal attention over a [B, T] batch
(flattened to B*T tokens, as the modules run). So one param tree (`models/loader.py`'s
layout: `layers_i`, fused `qkv_proj` / `gate_up_proj`, unpacked) serves both training here
and sampling in `jpaged.LLM`, with no second copy of the architecture to drift.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .llama import stack_layers, unstack_layers
from .registry import model_class

__all__ = ["CausalMetadata", "DenseCausalBackend", "causal_forward", "positions_from_mask"]

# Where a key is masked: finite, so that a row with every key masked (a padding token's)
# softmaxes to finite values instead of NaN; such rows' outputs are never read.
_MASKED = -1e30


class CausalMetadata(NamedTuple):
    """What the modules and `DenseCausalBackend.attend` read, for a batch of B rows of T
    tokens flattened to N = B*T (the modules read `query_start_loc[-1]` and `context_lens`
    only to skip padding rows in the packed matmul, which the training layout never uses)."""
    slot_mapping: jax.Array  # i32[N], unused: `write` keeps nothing
    context_lens: jax.Array  # i32[B] real tokens per row
    query_start_loc: jax.Array  # i32[B + 1] row offsets in the flat batch
    attention_mask: jax.Array  # bool[B, T] real tokens (its shape gives B and T)


@dataclasses.dataclass(frozen=True)
class DenseCausalBackend:
    """Dense causal attention over whole sequences, no KV cache: the `AttentionBackend`
    calls the model layers make (`write`, then `attend`), and nothing else. A token attends
    to the real tokens at or before it in its own row (and, with `sliding_window`, fewer
    than that many tokens back, as transformers' Mistral masks)."""
    sliding_window: int | None = None
    name: str = "dense-causal"

    def write(self, k_pool, v_pool, layer, k, v, slot_mapping):
        """The "pools" become this layer's K and V [N, kv_heads, head_dim]."""
        return k, v

    def attend(self, q, k, v, layer, meta: CausalMetadata, scale: float):
        """q [N, heads, hd], k and v [N, kv_heads, hd] (from `write`) -> [N, heads, hd]."""
        B, T = meta.attention_mask.shape
        N, H, D = q.shape
        KV = k.shape[1]
        G = H // KV  # query heads per KV head
        q = q.reshape(B, T, KV, G, D)
        k, v = k.reshape(B, T, KV, D), v.reshape(B, T, KV, D)
        s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
        t, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        allowed = j <= t
        if self.sliding_window:
            allowed &= t - j < self.sliding_window
        # Real keys only; a token always sees itself (so no row is wholly masked).
        allowed = (allowed[None] & meta.attention_mask[:, None, :]) | (t == j)[None]  # [B, T, T]
        s = jnp.where(allowed[:, None, None], s, _MASKED)
        p = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
        return out.reshape(N, H, D).astype(q.dtype)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """i32[B, T]: each real token's index among its row's real tokens (0 at the first real
    token, as transformers computes positions from the mask: left padding shifts nothing);
    padding tokens get 0."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0) * mask


def _params_tree(params: Any, config: ModelConfig, scan_layers: bool | None):
    """The bare tree (a Flax `{"params": ...}` wrapper dropped) in the layer layout asked
    for, and whether it is stacked; packed trees (the CPU runner's) are refused."""
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    if not isinstance(params, dict):
        raise TypeError(f"params must be the model's param tree (a dict), got {type(params).__name__}")
    stacked = "layers" in params
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = getattr(path[-1], "key", None)
        in_stack = getattr(path[0], "key", None) == "layers"
        if name in ("kernel", "embedding") and leaf.ndim != 2 + in_stack:
            where = "/".join(str(getattr(p, "key", p)) for p in path)
            raise ValueError(
                f"params look packed ({where} has shape {tuple(leaf.shape)}): causal_forward "
                "takes the unpacked tree (load_params, convert_state_dict or LLM.get_weights()), "
                "not the CPU runner's packed weights (`LLM.params` with pack_weights)")
    if scan_layers is None:
        return params, stacked
    if scan_layers and not stacked:
        params = stack_layers(params, config.num_layers)
    elif stacked and not scan_layers:
        params = unstack_layers(params, config.num_layers)
    return params, scan_layers


def causal_forward(config: ModelConfig, params: Any, token_ids: jax.Array,
                   attention_mask: jax.Array | None = None, *,
                   scan_layers: bool | None = None) -> jax.Array:
    """Logits f32[B, T, V] of a causal LM over `token_ids` i32[B, T]: the model the engine
    serves (`model_class(config.model_type)`: the Llama family or OPT), without a KV cache.

    `params`: the engine's unpacked tree (`models/loader.py`: `load_params`,
    `convert_state_dict`, `LLM.get_weights()`), per-layer `layers_i` or one stacked `layers`
    tree, float32 or bfloat16 (dots accumulate in float32). `attention_mask` [B, T]: 1 for
    real tokens, 0 for padding, on the right or on the left; positions count real tokens
    only (`positions_from_mask`). Padding rows' logits are finite but meaningless.
    `scan_layers`: run the layers under `nn.scan` (True) or unrolled (False), converting the
    layout inside the call (gradients then come back in the layout given); None follows the
    params' layout.

    Differentiable with respect to `params` and jittable with `config` (a hashable frozen
    dataclass) static, e.g. `jax.jit(causal_forward, static_argnums=0)`.
    """
    params, stacked = _params_tree(params, config, scan_layers)
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be [batch, tokens], got shape {token_ids.shape}")
    B, T = token_ids.shape
    if attention_mask is None:
        mask = jnp.ones((B, T), bool)
    else:
        mask = jnp.asarray(attention_mask).astype(bool)
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {mask.shape}, token_ids {(B, T)}")
    meta = CausalMetadata(slot_mapping=jnp.arange(B * T, dtype=jnp.int32),
                          context_lens=mask.sum(axis=1, dtype=jnp.int32),
                          query_start_loc=jnp.arange(B + 1, dtype=jnp.int32) * T,
                          attention_mask=mask)
    backend = DenseCausalBackend(config.sliding_window)
    module = model_class(config.model_type)(config, backend, scan_layers=stacked)
    flat = B * T
    # The "pools" the layers carry are each layer's K and V; under nn.scan the carry keeps
    # one shape, so it starts as zeros of that shape (never read).
    kv = jnp.zeros((flat, config.num_kv_heads, config.head_dim), jnp.float32)
    logits, _ = module.apply({"params": params}, token_ids.reshape(flat),
                             positions_from_mask(mask).reshape(flat), (kv, kv), meta,
                             jnp.arange(flat, dtype=jnp.int32))
    return logits.reshape(B, T, -1)
