"""jpaged: an LLM serving engine in JAX/XLA built on PagedAttention.

The public API is loaded on first use (as vLLM's), so that importing a host-side module
such as `jpaged.core.scheduler` does not import jax.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> the module that defines it
_API = {
    "LLM": "jpaged.entrypoints.llm",
    "EngineConfig": "jpaged.config",
    "SamplingParams": "jpaged.sampling_params",
    "BeamSearchParams": "jpaged.sampling_params",
    "RequestOutput": "jpaged.outputs",
    "CompletionOutput": "jpaged.outputs",
    "Logprob": "jpaged.outputs",
    "BeamSearchOutput": "jpaged.outputs",
    "serve": "jpaged.entrypoints.openai.launcher",
    "start_server": "jpaged.entrypoints.openai.launcher",
    "run_worker": "jpaged.engine.worker",
    "PagedKVCache": "jpaged.attention.paged_kv_cache",
}
__all__ = [*_API, "__version__"]

if TYPE_CHECKING:
    from .attention.paged_kv_cache import PagedKVCache
    from .config import EngineConfig
    from .entrypoints.llm import LLM
    from .engine.worker import run_worker
    from .entrypoints.openai.launcher import serve, start_server
    from .outputs import BeamSearchOutput, CompletionOutput, Logprob, RequestOutput
    from .sampling_params import BeamSearchParams, SamplingParams


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'jpaged' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
