"""Deviceless GPU targets: an XLA `GpuTargetConfigProto` per GPU of
`pallas_kernels/gpus.py` (shipped in `gpu_targets/`, see its README) becomes a topology of
one or more such GPUs on one host that jax compiles for without them. Needs the CUDA
plugin (`pip install "jax[cuda12-local]"`, about 1.1 GB) and `JAX_PLATFORMS=cpu` set before
jax is imported (else the plugin fails its start-up `cuInit` check and is not registered)."""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from jpaged.exceptions import DevicelessUnavailableError
from jpaged.pallas_kernels.gpus import GPUS


def target_config_dir() -> Path:
    """Where the GpuTargetConfigProto files are: $JPAGED_GPU_TARGETS, else the ones that
    ship with jpaged."""
    env = os.environ.get("JPAGED_GPU_TARGETS")
    return Path(env) if env else Path(__file__).resolve().parent / "gpu_targets"


def _target_config(gpu: str) -> Path:
    return target_config_dir() / GPUS[gpu].target_config


def deviceless_unavailable_reason(gpu: str) -> str | None:
    """None if `gpu` ("a100" / "h100") can be compiled for here, else the reason it cannot."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return ("deviceless GPU compilation needs the CUDA plugin "
                "(pip install 'jax[cuda12-local]==0.10.2', in its own venv)")
    path = _target_config(gpu)
    if not path.exists():
        return f"GPU target config {path} not found (set JPAGED_GPU_TARGETS)"
    if os.environ.get("JAX_PLATFORMS") != "cpu":
        return ("set JAX_PLATFORMS=cpu before importing jax "
                "(the CUDA plugin fails cuInit without a GPU)")
    return None


def unavailable_message(gpus) -> str | None:
    """"cannot compile for GPU: why" for the first of `gpus` that cannot be compiled for here
    (a script's error line), or None."""
    for gpu in gpus:
        reason = deviceless_unavailable_reason(gpu)
        if reason:
            return f"cannot compile for {gpu}: {reason}"
    return None


def gpu_topology(gpu: str, num_devices: int = 1):
    """A topology of `num_devices` GPUs `gpu` on one host ("1x1xN") built from its target
    config; raises `DevicelessUnavailableError` (saying why) where that cannot be done."""
    reason = deviceless_unavailable_reason(gpu)
    if reason:
        raise DevicelessUnavailableError(reason)
    from jax.experimental import topologies
    text = _target_config(gpu).read_text()
    return topologies.get_topology_desc("jpaged", "cuda", target_config=text,
                                        topology=f"1x1x{num_devices}")


def gpu_sharding(gpu: str) -> jax.sharding.NamedSharding:
    """Replicated sharding on the deviceless GPU: every spec of a deviceless compile carries it."""
    return jax.sharding.NamedSharding(gpu_mesh(gpu, 1, "d"), jax.sharding.PartitionSpec())


def gpu_mesh(gpu: str, num_devices: int, axis: str) -> jax.sharding.Mesh:
    """A one-axis mesh over `num_devices` deviceless GPUs (tensor parallelism)."""
    return jax.sharding.Mesh(np.array(gpu_topology(gpu, num_devices).devices), (axis,))
