"""Tests for `convert_state_dict` (models/loader.py): a transformers model's state dict, as
torch tensors, numpy or jax arrays, becomes the tree `load_params` reads from its folder,
with the config given as a PretrainedConfig, a dict or a ModelConfig; missing, unexpected
and misshapen tensors are refused by name."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jpaged.models import ModelConfig, convert_state_dict
from jpaged.models.loader import load_config, load_params

from helpers import build_tiny_hf

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, tied head: its state dict still holds `lm_head.weight`)
    and its folder."""
    path = tmp_path_factory.mktemp("state-dict") / "qwen2"
    return build_tiny_hf("qwen2", path, vocab_size=128), path


def test_state_dict_equals_the_folders_params(qwen2):
    hf, path = qwen2
    want = load_params(path, load_config(path))
    state = hf.state_dict()
    as_numpy = {k: v.numpy() for k, v in state.items()}
    as_jax = {k: jnp.asarray(v.numpy()) for k, v in state.items()}
    for sd, config in [(state, hf.config), (as_numpy, hf.config.to_dict()),
                       (as_jax, ModelConfig.from_hf_dict(hf.config.to_dict()))]:
        got = convert_state_dict(sd, config)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b)


def test_bfloat16_tensors_keep_their_values(qwen2):
    hf, _ = qwen2
    state = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    got = convert_state_dict(state, hf.config, dtype="bfloat16")
    want = state["model.layers.2.mlp.down_proj.weight"].float().numpy().T
    kernel = got["layers_2"]["down_proj"]["kernel"]
    assert kernel.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kernel.astype(np.float32), want)
    f32 = convert_state_dict(state, hf.config)["layers_2"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(f32, want)


def test_bad_state_dicts_are_refused_by_name(qwen2):
    hf, _ = qwen2
    state = dict(hf.state_dict())
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) model.layers.1.self_attn.k_proj.bias"):
        convert_state_dict(missing, hf.config)
    with pytest.raises(ValueError, match="no place for: model.layers.1.extra.weight"):
        convert_state_dict({**state, "model.layers.1.extra.weight": torch.zeros(3)}, hf.config)
    bad = {**state, "model.norm.weight": torch.zeros(63)}
    with pytest.raises(ValueError, match=r"'model.norm.weight' \(in the state dict\) has shape \(63,\)"):
        convert_state_dict(bad, hf.config)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        convert_state_dict(state, {**hf.config.to_dict(), "model_type": "gpt2"})
    with pytest.raises(TypeError, match="config must be"):
        convert_state_dict(state, 42)
