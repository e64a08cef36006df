"""Weights in and out of a running engine (docs/design.md, "Weights in place").

Callers hold the canonical param tree: per-layer `layers_i`, unpacked and whole on one
device, the layout `LLM(model=..., params=...)` and `jpaged.models.causal_forward` take
(models/loader.py's docstring). The runner may run another layout of the same numbers:
packed panels for the CPU matmul kernel, layers stacked under `scan_layers`, fused columns
regrouped and sharded under tensor parallelism. `WeightLayout` converts both ways in one
jitted function each, so that a new tree lands with exactly the shapes, dtypes and
shardings the step executables were compiled for: no step recompiles.

Both directions copy: the engine never shares an array with its caller, so a trainer may
keep, update or donate what it passed in or got back.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.models import ModelConfig
from jpaged.models.llama import pack_params, stack_layers, unstack_layers
from jpaged.ops.matmul import unpack

from . import parallel


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _unpack_rows(wp):
    """The inverse of `pack_rows`: [..., N / PANEL, K, PANEL] -> [..., N, K]."""
    *lead, p, k, panel = wp.shape
    return jnp.swapaxes(wp, -2, -1).reshape(*lead, p * panel, k)


def _ungroup(x, parts: list[int], size: int):
    """The inverse of `parallel._per_device`: device-major columns -> the parts, each whole,
    concatenated. `parts`: each part's width over all devices."""
    x = x.reshape(*x.shape[:-1], size, -1)
    out, start = [], 0
    for width in parts:
        w = width // size
        out.append(x[..., start:start + w].reshape(*x.shape[:-2], width))
        start += w
    return jnp.concatenate(out, axis=-1)


def _unrepeat_heads(x, num_heads: int, r: int):
    """The inverse of `parallel._repeat_heads`: keep the first of each head's r copies."""
    if r == 1:
        return x
    heads = x.reshape(*x.shape[:-1], num_heads, r, -1)
    return heads[..., 0, :].reshape(*x.shape[:-1], -1)


class WeightLayout:
    """The runner's layout of `params` (as the module runs them) and the canonical one.
    `config`: the canonical weights' config (before tensor parallelism repeats KV heads)."""

    def __init__(self, module, config: ModelConfig, params):
        self.config = config
        self.run_config = module.config
        self.packed = bool(getattr(module, "packed_weights", False))
        self.stacked = bool(getattr(module, "scan_layers", False))
        self.tensor_parallel = int(getattr(module, "tensor_parallel", 1))
        self.shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
        self.engine_spec = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        self.spec = jax.eval_shape(self._to_canonical, params)  # what callers pass and get
        self._to_engine_jit = jax.jit(self._to_engine, out_shardings=self.shardings)
        self._to_canonical_jit = jax.jit(self._to_canonical)

    # ---- the two directions -------------------------------------------------------------------

    def to_engine(self, params):
        """A canonical tree (checked by `check`) -> new arrays in the runner's layout."""
        return self._to_engine_jit(params)

    def to_canonical(self, params):
        """The runner's params -> a new canonical tree."""
        return self._to_canonical_jit(params)

    def _to_engine(self, params):
        # astype: new buffers, and weak types (a trainer's `x * 0.5`) made strong
        params = jax.tree_util.tree_map(lambda x, s: jnp.asarray(x).astype(s.dtype), params, self.spec)
        if self.stacked:
            params = stack_layers(params, self.config.num_layers)
        if self.tensor_parallel > 1:
            params = parallel.regroup_params(params, self.config, self.run_config,
                                             self.tensor_parallel)
        if self.packed:
            params = pack_params(params, self.config)
        return params

    def _to_canonical(self, params):
        base = 3 if self.stacked else 2  # a kernel's dimensions, unpacked
        c, T = self.config, self.tensor_parallel
        H, KV, D, I = c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        r = self.run_config.num_kv_heads // KV

        def visit(tree, parent=""):
            out = {}
            for name, x in tree.items():
                if isinstance(x, dict):
                    out[name] = visit(x, name)
                    continue
                x = jnp.asarray(x)
                if self.packed and name == "kernel" and x.ndim == base + 1:
                    x = unpack(x)
                elif self.packed and parent == "embed_tokens" and x.ndim == 3:
                    x = _unpack_rows(x)
                if T > 1 and parent == "qkv_proj":
                    x = _ungroup(x, [H * D, KV * r * D, KV * r * D], T)
                    q, k, v = x[..., :H * D], x[..., H * D:(H + KV * r) * D], x[..., (H + KV * r) * D:]
                    x = jnp.concatenate([q, _unrepeat_heads(k, KV, r), _unrepeat_heads(v, KV, r)], -1)
                elif T > 1 and parent == "gate_up_proj":
                    x = _ungroup(x, [I, I], T)
                out[name] = x + 0  # a new buffer even where nothing changed
            return out
        params = visit(params)
        return unstack_layers(params, c.num_layers) if self.stacked else params

    # ---- checks -----------------------------------------------------------------------------

    def normalize(self, params):
        """`params` as `to_engine` takes it: a flax variables dict unwrapped, a stacked
        `layers` tree unstacked; a ValueError naming the first leaf whose path, shape or
        dtype differs from the engine's canonical tree (nothing is changed then)."""
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a nested dict of arrays, got {type(params).__name__}")
        if set(params) == {"params"}:
            params = params["params"]
        if "layers" in params:
            params = unstack_layers(dict(params), self.config.num_layers)
        given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
        expected = dict(jax.tree_util.tree_flatten_with_path(self.spec)[0])
        values = {_path_name(p): x for p, x in given.items()}
        by_name = dict(values)
        for path, spec in expected.items():
            name = _path_name(path)
            if name not in by_name:
                raise ValueError(f"params lack {name!r} (expected shape {spec.shape}, {spec.dtype})")
            x = by_name.pop(name)
            shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
            if shape is None or dtype is None:
                raise ValueError(f"params[{name!r}] is a {type(x).__name__}, not an array")
            if tuple(shape) != spec.shape:
                raise ValueError(f"params[{name!r}] has shape {tuple(shape)}, the engine's "
                                 f"has {spec.shape}")
            if np.dtype(dtype) != spec.dtype:
                raise ValueError(f"params[{name!r}] has dtype {np.dtype(dtype)}, the engine's "
                                 f"has {spec.dtype} (cast it, e.g. with .astype)")
        if by_name:
            extra = sorted(by_name)
            raise ValueError(f"params hold {extra[0]!r}"
                             + (f" and {len(extra) - 1} more leaves" if len(extra) > 1 else "")
                             + ", which the engine's model has no place for")
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(self.spec),
                                            [values[_path_name(p)] for p in expected])

    @property
    def num_bytes(self) -> int:
        return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree_util.tree_leaves(self.spec))
