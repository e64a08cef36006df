"""Picks the attention backend for `EngineConfig.attention_backend` (docs/design.md,
"Attention backends").

`auto` is `cpu` on the CPU (the C++ kernel; `xla` with a warning where it does not build)
and `pallas` on a GPU. Backends are imported only when chosen: the Pallas kernels need
nothing on a CPU run, the CPU kernel nothing on a GPU one.
"""
from __future__ import annotations

import logging

import jax

from jpaged.exceptions import KernelBuildError

from .backend import AttentionBackend


def get_backend(name: str) -> AttentionBackend:
    auto = name == "auto"
    if auto:
        name = "cpu" if jax.default_backend() == "cpu" else "pallas"
    if name == "cpu":
        from . import cpu
        if (reason := cpu.available()) is None:
            return cpu.CpuBackend()
        if not auto:
            raise KernelBuildError(f"attention_backend='cpu' needs its C++ kernel, which failed "
                                   f"to build: {reason}")
        logging.getLogger(__name__).warning(
            "the C++ CPU attention kernel is unavailable, using the slower `xla` backend: %s", reason)
        name = "xla"
    if name == "xla":
        from .xla import XlaBackend
        return XlaBackend()
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend()
    if name in ("pallas", "pallas-interpret"):
        from .pallas import PallasBackend
        return PallasBackend(name=name, interpret=name == "pallas-interpret")
    raise ValueError(f"unknown attention_backend {name!r}")
