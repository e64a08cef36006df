"""Tensor parallelism on a JAX mesh (`tensor_parallel_size`), Megatron-style
(docs/design.md, "Tensor parallelism").

One mesh axis, `tp`, over that many devices. Each device holds its query and KV heads'
columns of `qkv_proj` and its slice of the MLP's `gate_up_proj` columns; `o_proj` and
`down_proj` are split by rows, so XLA's partitioner adds one all-reduce after attention
and one after the MLP. Embeddings, norms and the head are replicated: sampling sees the
whole vocabulary. The KV pool is split by KV heads, so one block table serves every
device. With fewer KV heads than devices, each KV head is repeated (as vLLM does) until
there are as many as devices. The fused columns are regrouped per device
(`regroup_params`): device d's q, k, v heads (gate, up columns) next to each other, which
at one device is the layout the loader made.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpaged.attention.sharded import AXIS  # the mesh's one axis, which the backend splits heads on
from jpaged.models import ModelConfig


def plan_layout(config: ModelConfig, size: int) -> ModelConfig:
    """The model config as the devices run it (KV heads repeated up to `size` where there
    are fewer), or a ValueError naming the sizes that do not split."""
    H, KV, I = config.num_heads, config.num_kv_heads, config.intermediate_size
    problems = []
    if H % size:
        problems.append(f"its {H} query heads are not divisible by {size}")
    if KV % size and size % KV:
        problems.append(f"its {KV} KV heads neither divide nor are divisible by {size}")
    if I % size:
        problems.append(f"its MLP width {I} is not divisible by {size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not split this model: "
                         f"{'; '.join(problems)}")
    return config if KV >= size else dataclasses.replace(config, num_kv_heads=size)


def make_mesh(size: int) -> Mesh:
    devices = jax.devices()
    if len(devices) < size:
        hint = (f" (on the CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count={size}"
                " to split it into devices)" if jax.default_backend() == "cpu" else "")
        raise ValueError(f"tensor_parallel_size={size} needs {size} devices; "
                         f"{jax.default_backend()} has {len(devices)}{hint}")
    return Mesh(np.array(devices[:size]), (AXIS,))


def _repeat_heads(x, num_heads: int, r: int):
    """[..., heads * D] -> [..., heads * r * D], each head followed by its copies."""
    if r == 1:
        return x
    xp = np if isinstance(x, np.ndarray) else jax.numpy
    heads = x.reshape(*x.shape[:-1], num_heads, -1)
    return xp.repeat(heads, r, axis=-2).reshape(*x.shape[:-1], -1)


def _per_device(parts, size: int):
    """Concatenated column parts -> device-major: device d's slice of each part, in order."""
    xp = np if isinstance(parts[0], np.ndarray) else jax.numpy
    return xp.concatenate([p.reshape(*p.shape[:-1], size, -1) for p in parts], axis=-1).reshape(
        *parts[0].shape[:-1], -1)


def regroup_params(params: dict, config: ModelConfig, run: ModelConfig, size: int) -> dict:
    """Fused `qkv_proj` and `gate_up_proj` columns (kernels and biases) regrouped per device
    for `size` devices, KV heads repeated to `run.num_kv_heads`; a new tree."""
    H, KV, D, I = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    r = run.num_kv_heads // KV

    def qkv(x):
        q, k, v = x[..., :H * D], x[..., H * D:(H + KV) * D], x[..., (H + KV) * D:]
        return _per_device([q, _repeat_heads(k, KV, r), _repeat_heads(v, KV, r)], size)

    def gate_up(x):
        return _per_device([x[..., :I], x[..., I:]], size)

    regroup = {"qkv_proj": qkv, "gate_up_proj": gate_up}

    def visit(tree, parent=""):
        return {k: visit(v, k) if isinstance(v, dict) else regroup[parent](v) if parent in regroup else v
                for k, v in tree.items()}
    return visit(params)


# Which axis of a (layer's) param is split: kernels of the column-split layers by columns
# (and their biases), of the row-split layers by rows; everything else is replicated.
_SPLIT = {("qkv_proj", "kernel"): -1, ("qkv_proj", "bias"): -1, ("gate_up_proj", "kernel"): -1,
          ("o_proj", "kernel"): -2, ("down_proj", "kernel"): -2,
          ("fc1", "kernel"): -1, ("fc1", "bias"): -1, ("fc2", "kernel"): -2}  # OPT's MLP


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """A NamedSharding for every param (a stacked layer axis, if any, is not split)."""
    def visit(tree, layer=""):
        out = {}
        for name, x in tree.items():
            if isinstance(x, dict):
                out[name] = visit(x, name)
                continue
            axis = _SPLIT.get((layer, name))
            spec = [None] * x.ndim
            if axis is not None:
                spec[axis] = AXIS
            out[name] = NamedSharding(mesh, P(*spec))
        return out
    return visit(params)
