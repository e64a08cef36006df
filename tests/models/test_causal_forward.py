"""Tests for models/causal.py: `causal_forward` over the engine's param tree (made by
`convert_state_dict` from a transformers model's state dict) gives transformers' logits for
tiny random Llama-family and OPT models, on batches padded on the right and on the left;
its gradients equal torch's; stacked layers (nn.scan) and bfloat16 weights run; packed params
are refused. (Against
the engine's own logits: tests/models/test_in_memory.py.)"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpaged.models import ModelConfig, causal_forward, convert_state_dict
from jpaged.models.causal import positions_from_mask
from jpaged.models.llama import pack_params

from helpers import build_tiny_hf
from test_opt import build_tiny_opt  # every weight random, norms and biases too

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 512
B, T = 3, 12
# Row 0 full, row 1 padded on the right (7 real tokens), row 2 on the left (4 pad tokens).
MASK = np.ones((B, T), np.int64)
MASK[1, 7:] = 0
MASK[2, :4] = 0
IDS = np.random.default_rng(0).integers(3, VOCAB, (B, T))


@functools.lru_cache(maxsize=None)
def model(kind: str, tmp_root: str):
    """(transformers model, ModelConfig, jpaged params) of one tiny kind."""
    if kind == "opt-pre":
        hf = build_tiny_opt(f"{tmp_root}/{kind}", num_hidden_layers=2)
    elif kind == "opt-post-proj":  # OPT-350M's shape: post-norm, 32-wide embeddings
        hf = build_tiny_opt(f"{tmp_root}/{kind}", num_hidden_layers=2, do_layer_norm_before=False,
                            word_embed_proj_dim=32)
    else:
        hf = build_tiny_hf(kind, f"{tmp_root}/{kind}", vocab_size=VOCAB)
    config = ModelConfig.from_hf_dict(hf.config.to_dict())
    return hf, config, convert_state_dict(hf.state_dict(), hf.config)


def hf_logits(hf, ids, mask):
    """transformers' logits; Llama-family positions given as transformers' `generate` counts
    them from the mask (a plain forward counts from 0 at the first column), OPT's from the
    mask by the model itself."""
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if hf.config.model_type != "opt":
        kwargs["position_ids"] = torch.tensor(np.asarray(positions_from_mask(mask)), dtype=torch.long)
    return hf(**kwargs).logits


def loss_fn(logits, ids, mask):
    """Mean next-token cross-entropy over real (token, next token) pairs."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weight = mask[:, :-1] * mask[:, 1:]
    return (nll * weight).sum() / weight.sum()


def torch_loss(hf):
    """transformers' logits (padding rows included) and `loss_fn` in torch, backpropagated."""
    hf.zero_grad()
    ids, mask = torch.tensor(IDS), torch.tensor(MASK, dtype=torch.float32)
    logits = hf_logits(hf, IDS, MASK)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    weight = mask[:, :-1] * mask[:, 1:]
    loss = (nll * weight).sum() / weight.sum()
    loss.backward()
    return logits.detach().numpy(), float(loss.detach())


# One compile per model: logits and gradients together. Llama: GQA, RoPE with llama3
# scaling, untied head; OPT (pre-norm): learned positions, biases, a tied head.
@pytest.mark.parametrize("kind", ["llama", "opt-pre"])
def test_logits_and_gradients_match_transformers(kind, tmp_path_factory):
    hf, config, params = model(kind, str(tmp_path_factory.getbasetemp()))
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)

    def loss(p):
        logits = causal_forward(config, p, ids, mask)
        return loss_fn(logits, ids, mask.astype(jnp.float32)), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    logits = np.asarray(logits)
    assert logits.shape == (B, T, config.vocab_size) and logits.dtype == np.float32 and np.isfinite(logits).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    want_logits, want_loss = torch_loss(hf)
    real = MASK.astype(bool)
    np.testing.assert_allclose(logits[real], want_logits[real], atol=2e-4, rtol=1e-4, err_msg=kind)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)

    # One tensor of each kind: part of a fused projection (torch's layout is our kernel's
    # transpose), an MLP weight, an embedding.
    named = dict(hf.named_parameters())
    q = config.num_heads * config.head_dim
    if kind == "llama":
        pairs = [("model.layers.1.self_attn.k_proj.weight",
                  grads["layers_1"]["qkv_proj"]["kernel"][:, q:q + config.num_kv_heads * config.head_dim].T),
                 ("model.layers.0.mlp.up_proj.weight",
                  grads["layers_0"]["gate_up_proj"]["kernel"][:, config.intermediate_size:].T),
                 ("model.embed_tokens.weight", grads["embed_tokens"]["embedding"])]
    else:
        pairs = [("model.decoder.layers.1.self_attn.v_proj.bias", grads["layers_1"]["qkv_proj"]["bias"][2 * q:]),
                 ("model.decoder.layers.0.fc1.weight", grads["layers_0"]["fc1"]["kernel"].T),
                 ("model.decoder.embed_positions.weight", grads["embed_positions"]["embedding"])]
    for name, got in pairs:
        want = named[name].grad.numpy()
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6 + 1e-4 * np.abs(want).max(), err_msg=name)


def test_scanned_post_norm_opt_matches_transformers(tmp_path_factory):
    """OPT-350M's shape (post-norm, project_in/out), its layers stacked under nn.scan."""
    hf, config, params = model("opt-post-proj", str(tmp_path_factory.getbasetemp()))
    got = np.asarray(jax.jit(causal_forward, static_argnums=0, static_argnames="scan_layers")(
        config, params, IDS, MASK, scan_layers=True))
    with torch.no_grad():
        want = hf_logits(hf, IDS, MASK).numpy()
    real = MASK.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=2e-4, rtol=1e-4)


def test_bfloat16_params(tmp_path_factory):
    """bfloat16 weights from a bfloat16 torch state dict (float32 accumulation, float32
    logits) stay close to float32's."""
    hf, config, params = model("llama", str(tmp_path_factory.getbasetemp()))
    forward = jax.jit(causal_forward, static_argnums=0)
    state = {name: x.to(torch.bfloat16) for name, x in hf.state_dict().items()}
    bf16 = convert_state_dict(state, hf.config, dtype="bfloat16")
    assert bf16["layers_0"]["qkv_proj"]["kernel"].dtype == jnp.bfloat16
    got, base = (np.asarray(forward(config, p, IDS, MASK)) for p in (bf16, params))
    assert got.dtype == np.float32
    real = MASK.astype(bool)
    assert np.abs(got[real] - base[real]).max() < 0.05 * np.abs(base).max()


def test_packed_params_are_refused(tmp_path_factory):
    hf, config, params = model("llama", str(tmp_path_factory.getbasetemp()))
    with pytest.raises(ValueError, match="packed"):
        causal_forward(config, pack_params(params, config), IDS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        causal_forward(config, params, IDS, MASK[:, :5])
