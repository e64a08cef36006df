"""What the runner runs: the Flax module, its params on the device, the model's config,
tokenizer and generation defaults, from a path or from an in-memory model.

A path (or None, the embedded default) is read by `jpaged.models.loader`, the weights of a
folder `jpaged convert` wrote by `checkpoint` (straight into the devices' shards); an in-memory
Flax model comes with its own params and tokenizer (a research pipeline's model). Either
way the module gets the chosen attention backend, and the params the layer layout the
module runs (unrolled `layers_i`, or one stacked `layers` tree under `scan_layers`), packed
for the CPU matmul kernel where it runs (`pack_weights`; `jpaged.ops.matmul`).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from jpaged.attention.backend import AttentionBackend
from jpaged.attention.selector import get_backend
from jpaged.attention.sharded import ShardedBackend
from jpaged.exceptions import KernelBuildError
from jpaged.models import ModelConfig, model_class
from jpaged.models.llama import pack_params, stack_layers, unstack_layers
from jpaged.ops import matmul

from . import checkpoint, parallel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    module: Any  # the Flax module, with `backend` set
    backend: AttentionBackend
    params: Any  # its params, on the device
    config: ModelConfig
    tokenizer: Any
    path: str | None  # the file or folder loaded; None for an in-memory model
    generation_config: dict[str, Any]  # SamplingParams defaults the model's files set
    # The config of the weights as callers hold them (`runner.weights`); under tensor
    # parallelism `config` is the one the devices run (KV heads repeated). None: `config`.
    weights_config: ModelConfig | None = None


def resolve_dtype(dtype: str) -> str:
    """`auto` is float32 on the CPU and bfloat16 on accelerators."""
    if dtype != "auto":
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _packs(module, params, pack_weights: bool | None) -> bool:
    """Whether to pack the weights (`EngineConfig.pack_weights`; None: where it works)."""
    if pack_weights is False or not hasattr(module, "packed_weights") or module.packed_weights:
        return False
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    if jax.default_backend() != "cpu" or dtype not in (jnp.float32, jnp.bfloat16):
        if pack_weights:
            raise ValueError(f"pack_weights=True needs float32 or bfloat16 weights on the CPU, "
                             f"got {dtype} on {jax.default_backend()}")
        return False
    if (reason := matmul.available()) is not None:
        if pack_weights:
            raise KernelBuildError(f"pack_weights=True needs the C++ matmul kernel, which failed "
                                   f"to build: {reason}")
        log.warning("the C++ CPU matmul kernel is unavailable, weights stay unpacked: %s", reason)
        return False
    return True


def is_default_model(path: str | None) -> bool:
    """Whether `path` is the embedded default model's file."""
    if path is None:
        return False
    from jpaged.models.loader import resolve_model_path
    try:
        return pathlib.Path(path).resolve() == resolve_model_path(None)
    except Exception:  # noqa: BLE001 - no default model installed
        return False


def load_model(model, *, params=None, tokenizer=None, dtype: str = "auto",
               scan_layers: bool | None = None, attention_backend: str = "auto",
               pack_weights: bool | None = None, tensor_parallel_size: int = 1) -> LoadedModel:
    """`model`: None (the embedded SmolLM2-135M-Instruct), a path to a HF folder or a .gguf
    file, or an in-memory Flax model (then `params` and `tokenizer` are required); the other
    arguments are the `EngineConfig` fields of the same names."""
    backend = get_backend(attention_backend)
    dtype = resolve_dtype(dtype)
    if isinstance(model, ModelConfig):
        raise TypeError("pass a Flax model instance (e.g. LlamaForCausalLM(config, backend)), "
                        "not a ModelConfig")
    generation_config: dict[str, Any] = {}
    converted = None  # a `jpaged convert` folder: its params are restored below, on the devices
    if hasattr(model, "apply") and hasattr(model, "config"):  # in-memory Flax model
        if params is None or tokenizer is None:
            raise ValueError("an in-memory model needs params= and tokenizer=")
        model_config = model.config
        module = model.clone(backend=backend)
        params = params.get("params", params)
        path = None
    else:
        from jpaged.models.loader import (is_converted, load_config, load_generation_config,
                                          load_params, load_tokenizer, resolve_model_path)
        resolved = resolve_model_path(model)
        path = str(resolved)
        model_config = load_config(resolved)
        tokenizer = tokenizer or load_tokenizer(resolved)
        if is_converted(resolved):
            converted = resolved
        else:
            params = load_params(resolved, model_config, dtype)
        generation_config = load_generation_config(resolved)
        module = model_class(model_config.model_type)(model_config, backend, jnp.dtype(dtype))
    if not hasattr(module, "scan_layers"):
        if scan_layers is not None:
            raise ValueError(f"scan_layers={scan_layers} needs a model with a `scan_layers` "
                             f"field; {type(module).__name__} has none")
    else:
        if scan_layers is not None:
            module = module.clone(scan_layers=scan_layers)
        if converted is None:
            params = (stack_layers if module.scan_layers else unstack_layers)(
                params, model_config.num_layers)
    stacked = getattr(module, "scan_layers", False)
    if tensor_parallel_size > 1:
        return _split(module, backend, params, model_config, tokenizer, path, generation_config,
                      tensor_parallel_size, pack_weights, converted, dtype, stacked)
    if converted is not None:
        params = checkpoint.restore(converted, model_config, dtype, None, stacked)
    if _packs(module, params, pack_weights):
        params = pack_params(params, model_config)
        module = module.clone(packed_weights=True)
    return LoadedModel(module, backend, jax.device_put(params), model_config, tokenizer, path,
                       generation_config)


def _split(module, backend, params, config, tokenizer, path, generation_config, size: int,
           pack_weights: bool | None, converted, dtype: str, stacked: bool) -> LoadedModel:
    """The model over a mesh of `size` devices (`jpaged.runner.parallel`): params regrouped
    and placed into their shards (a converted folder's: each device reads only its own),
    the pool's backend run per device."""
    if not hasattr(module, "tensor_parallel"):
        raise ValueError(f"tensor_parallel_size={size} needs a model with a `tensor_parallel` "
                         f"field; {type(module).__name__} has none")
    if pack_weights:  # the packed matmul is a custom call XLA's partitioner cannot split
        raise ValueError("pack_weights=True does not combine with tensor_parallel_size > 1")
    run = parallel.plan_layout(config, size)
    mesh = parallel.make_mesh(size)
    if converted is not None:
        params = checkpoint.restore(converted, config, dtype, mesh, stacked)
    else:
        params = parallel.regroup_params(params, config, run, size)
        params = jax.device_put(params, parallel.param_shardings(params, mesh))
    backend = ShardedBackend(backend, mesh)
    module = module.clone(config=run, backend=backend, tensor_parallel=size)
    return LoadedModel(module, backend, params, run, tokenizer, path, generation_config, config)
