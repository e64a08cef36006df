"""Converted checkpoints (`jpaged convert`): a model folder whose weights are an orbax
checkpoint that any `tensor_parallel_size` restores straight into its devices' shards.

The folder is a Hugging Face folder without weights (config.json, tokenizer, generation
config) plus `params/` (orbax: tensorstore OCDBT, uncompressed) and the marker
`jpaged_checkpoint.json` (`models.loader.CONVERTED_MARKER`, written last). Each weight
that tensor parallelism splits is stored per layer with its split axis as an axis of units
(query or KV heads, slices of MLP columns) and one storage chunk per layer and unit, so each
device reads only its own chunks. The fused, per-device-regrouped `qkv_proj` and
`gate_up_proj` columns (`parallel.regroup_params`) are made on the devices, each from its
own slices under shard_map: no device ever holds, and no host ever gathers, the whole model.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jpaged.attention.sharded import AXIS
from jpaged.models import ModelConfig
from jpaged.models import loader
from jpaged.models.llama import stack_layers

from . import parallel

PARAMS_DIR = "params"
FORMAT = 1
# Each layer's split weights as stored (`layer_shapes`): column-split kernels [D, units, n],
# row-split ones [units, n, D], biases [units, n] (`UNIT_AXIS`: where the units are). A
# device's part is its units, concatenated along that axis and reshaped: no transpose, and
# an XLA concatenation of whole [units, n] rows runs several times faster on the CPU than
# one of flattened columns.
COLUMN_SPLIT = ("q", "k", "v", "gate", "up")
ROW_SPLIT = ("o", "down")
BIASES = ("q_bias", "k_bias", "v_bias")
UNIT_AXIS = {**dict.fromkeys(COLUMN_SPLIT, 1), **dict.fromkeys(ROW_SPLIT + BIASES, 0)}
KV_NAMES = ("k", "v", "k_bias", "v_bias")  # read whole by every device when KV heads repeat
# What an HF folder holds besides its weights (tokenizer, generation config...) is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def mlp_units(config: ModelConfig) -> int:
    """How many slices the MLP columns are stored in: every tensor_parallel_size that
    splits the model divides both the query heads and the MLP width (`plan_layout`)."""
    return math.gcd(config.num_heads, config.intermediate_size)


def layer_shapes(config: ModelConfig, units: int) -> dict:
    """One stored layer: its split weights in the layouts above, and its two norms."""
    D, H, KV, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    n = config.intermediate_size // units
    shapes = {"attn_norm": (D,), "mlp_norm": (D,), "q": (D, H, hd), "k": (D, KV, hd),
              "v": (D, KV, hd), "o": (H, hd, D), "gate": (D, units, n), "up": (D, units, n),
              "down": (units, n, D)}
    if config.attention_bias:
        shapes.update(q_bias=(H, hd), k_bias=(KV, hd), v_bias=(KV, hd))
    return shapes


def stored_shapes(config: ModelConfig, units: int) -> dict:
    """The stored tree: the module's params with each `layers_i` in `layer_shapes`. One tree
    per layer, not stacked: each layer is fused as it is, without slicing a stack."""
    V, D = config.vocab_size, config.hidden_size
    shapes = {"embed_tokens": {"embedding": (V, D)}, "norm": {"scale": (D,)},
              **{f"layers_{i}": layer_shapes(config, units) for i in range(config.num_layers)}}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = {"kernel": (D, V)}
    return shapes


def to_stored(params: dict, config: ModelConfig, units: int) -> dict:
    """The loader's per-layer host tree -> the stored tree, layer by layer in place, so the
    host holds about one copy of the weights, not two."""
    H, KV, hd, F = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    shapes = layer_shapes(config, units)
    for i in range(config.num_layers):
        layer = params[f"layers_{i}"]
        qkv, gate_up = layer["qkv_proj"]["kernel"], layer["gate_up_proj"]["kernel"]
        parts = {"q": qkv[:, :H * hd], "k": qkv[:, H * hd:(H + KV) * hd],
                 "v": qkv[:, (H + KV) * hd:], "o": layer["o_proj"]["kernel"],
                 "gate": gate_up[:, :F], "up": gate_up[:, F:],
                 "down": layer["down_proj"]["kernel"],
                 "attn_norm": layer["attn_norm"]["scale"], "mlp_norm": layer["mlp_norm"]["scale"]}
        if config.attention_bias:
            b = layer["qkv_proj"]["bias"]
            parts.update(q_bias=b[:H * hd], k_bias=b[H * hd:(H + KV) * hd], v_bias=b[(H + KV) * hd:])
        params[f"layers_{i}"] = {k: np.ascontiguousarray(x).reshape(shapes[k]) for k, x in parts.items()}
    return params


def convert(model, out_dir, dtype: str = "float32") -> pathlib.Path:
    """Writes the converted folder of `model` (None, a .gguf, an HF folder) to `out_dir`,
    which must not exist or be empty; weights in `dtype`. Returns the folder."""
    from jpaged.models.gguf import gguf_header, gguf_to_hf_config
    src = loader.resolve_model_path(model)
    out = pathlib.Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; pick a new OUT_DIR")
    config = loader.load_config(src)
    if config.model_type == "opt":  # the stored layout is the Llama layer's (q/k/v, gate/up/down)
        raise ValueError(f"jpaged convert takes Llama-architecture models; {src} is OPT, which "
                         "loads from its HF folder directly")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep other users from loading the model
    try:
        if loader.is_gguf(src):
            (tmp / "config.json").write_text(json.dumps(gguf_to_hf_config(gguf_header(src), src),
                                                        indent=2))
            loader.load_tokenizer(src).save_pretrained(str(tmp))
        else:
            for f in src.iterdir():
                if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES + (".index.json",)):
                    shutil.copy2(f, tmp / f.name)
        units = mlp_units(config)
        save(to_stored(loader.load_params(src, config, dtype), config, units), tmp / PARAMS_DIR)
        (tmp / loader.CONVERTED_MARKER).write_text(json.dumps(
            {"format": FORMAT, "dtype": str(np.dtype(dtype)), "mlp_units": units,
             "source": str(src)}, indent=2))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save(stored: dict, path: pathlib.Path) -> None:
    import orbax.checkpoint as ocp
    # shard_axes: one storage chunk per unit, so a device's read touches only its own units. No compression: weights barely compress, and decompressing costs the load.
    save_args = {k: jax.tree.map(lambda _: ocp.SaveArgs(), v) if not k.startswith("layers_")
                 else {n: ocp.SaveArgs(shard_axes=(UNIT_AXIS[n],) if n in UNIT_AXIS else ()) for n in v}
                 for k, v in stored.items()}
    with ocp.PyTreeCheckpointer(use_compression=False) as ckpt:
        ckpt.save(path, args=ocp.args.PyTreeSave(stored, save_args=save_args))


def kv_repeat(config: ModelConfig, mesh: Mesh | None) -> int:
    """How many devices share each KV head (`parallel.plan_layout` repeats them)."""
    return 1 if mesh is None else parallel.plan_layout(config, mesh.size).num_kv_heads // config.num_kv_heads


def restore_target(config: ModelConfig, units: int, dtype: str, mesh: Mesh | None) -> dict:
    """The stored tree as orbax restores it: each split array over `mesh` by units, every
    device reading only its own; the rest (and k, v where KV heads repeat) whole."""
    repeat = kv_repeat(config, mesh)

    def place(name):
        if mesh is None:
            return SingleDeviceSharding(jax.devices()[0])
        if name not in UNIT_AXIS or (repeat > 1 and name in KV_NAMES):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*[None] * UNIT_AXIS[name], AXIS))

    def abstract(tree):
        return {k: abstract(v) if isinstance(v, dict) else
                jax.ShapeDtypeStruct(v, jnp.dtype(dtype), sharding=place(k)) for k, v in tree.items()}
    return abstract(stored_shapes(config, units))


def restore(path: str | os.PathLike, config: ModelConfig, dtype: str, mesh: Mesh | None = None,
            stacked: bool = False) -> dict:
    """The module's params from a converted folder, on the devices: on the first device
    (`mesh` None), or over `mesh` in `parallel`'s layout (regrouped, KV heads repeated,
    `param_shardings`). `stacked`: one `layers` tree (scan_layers), else `layers_i`."""
    import orbax.checkpoint as ocp
    path = pathlib.Path(path)
    meta = json.loads((path / loader.CONVERTED_MARKER).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} holds a jpaged checkpoint of format {meta.get('format')}; this "
                         f"jpaged reads format {FORMAT}: convert the model again")
    target = restore_target(config, meta["mlp_units"], dtype, mesh)
    with ocp.PyTreeCheckpointer() as ckpt:
        stored = ckpt.restore(path / PARAMS_DIR, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    fuse = _fuser(config, meta["mlp_units"], mesh)
    # layer by layer, each stored layer dropped once fused: about one copy of the weights
    for i in range(config.num_layers):
        stored[f"layers_{i}"] = fuse(stored[f"layers_{i}"])
    return stack_layers(stored, config.num_layers) if stacked else stored


@functools.lru_cache(maxsize=8)
def _fuser(config: ModelConfig, units: int, mesh: Mesh | None):
    """The jitted step: one stored layer -> the module's params of that layer, each device
    making its part from its own slices; cached, so a second load compiles nothing."""
    if mesh is None:
        return jax.jit(functools.partial(_fuse, device=0, repeat=1))
    repeat = kv_repeat(config, mesh)
    target = restore_target(config, units, "float32", mesh)["layers_0"]
    # out_specs: parallel's shardings of the module's params (only their ranks are read)
    shapes = jax.eval_shape(functools.partial(_fuse, device=0, repeat=1), target)
    out_specs = jax.tree.map(lambda s: s.spec, parallel.param_shardings(shapes, mesh))
    return jax.jit(shard_map(lambda s: _fuse(s, lax.axis_index(AXIS), repeat), mesh=mesh,
                             in_specs=(jax.tree.map(lambda x: x.sharding.spec, target),),
                             out_specs=out_specs))


def _fuse(s: dict, device, repeat: int) -> dict:
    """One device's slices of one stored layer -> its part of the module's layer params."""
    def part(name):  # KV heads repeated: this device's head of the whole, replicated array
        x = s[name]
        if repeat > 1 and name in KV_NAMES:
            x = lax.dynamic_slice_in_dim(x, device // repeat, 1, axis=UNIT_AXIS[name])
        return x

    def fused(*names):  # concatenated along the units, then [D, units, n] -> [D, units * n]
        x = jnp.concatenate([part(n) for n in names], axis=UNIT_AXIS[names[0]])
        return x.reshape(x.shape[0], -1) if x.ndim == 3 else x.reshape(-1)

    def rows(name):  # [units, n, D] -> [units * n, D]
        return part(name).reshape(-1, s[name].shape[-1])

    qkv = {"kernel": fused("q", "k", "v")}
    if "q_bias" in s:
        qkv["bias"] = fused(*BIASES)
    return {"attn_norm": {"scale": s["attn_norm"]}, "qkv_proj": qkv, "o_proj": {"kernel": rows("o")},
            "mlp_norm": {"scale": s["mlp_norm"]}, "gate_up_proj": {"kernel": fused("gate", "up")},
            "down_proj": {"kernel": rows("down")}}
