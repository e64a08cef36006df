"""The `cpu` attention backend: `csrc/paged_attention_cpu.cc` as an XLA FFI custom call.

The kernel is compiled on first use with the system's C++ compiler for this machine's
CPU (`-march=native`), cached in `utils.cache_root()` by a hash of the source,
the compiler flags, the jaxlib version and the CPU, and registered with `jax.ffi` (JAX's
documented way to add a CPU kernel to XLA; Pallas has no CPU backend). Without a
compiler, `auto` keeps the pure-jnp `xla` backend and logs why.

Pool layout, writes, block copies and swaps are the `xla` backend's; only `attend` differs,
and only for the shapes the kernel handles (`supported`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jpaged.exceptions import KernelBuildError
from jpaged.utils import cache_root

from .metadata import AttentionMetadata
from .xla import XlaBackend

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention_cpu.cc"
TARGET = "jpaged_paged_attention"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
HEAD_DIMS = (32, 64, 96, 128, 256)  # the kernel's instantiations (head_dim / 16 vectors)


def supported(block_size: int, head_dim: int) -> bool:
    """Shapes the kernel handles: 16-token pages (one vector of keys) and these head dims."""
    return block_size == 16 and head_dim in HEAD_DIMS


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def library_path() -> Path:
    import jaxlib
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), jaxlib.__version__,
                                    _cpu_id()]).encode()).hexdigest()[:16]
    return cache_root() / f"paged_attention_cpu-{key}.so"


def build(path: Path) -> None:
    """Compile the kernel to `path` (atomically: concurrent builders don't see half a file)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    except OSError as e:
        raise KernelBuildError(f"cannot write the kernel to {path.parent} ({e}); set JPAGED_CACHE_DIR") from e
    os.close(fd)
    cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> None:
    """Build (once per machine) and register the kernel; raises KernelBuildError."""
    path = library_path()
    if not path.exists():
        from tqdm.auto import tqdm
        log.info("compiling the CPU paged-attention kernel to %s", path)
        with tqdm(total=1, desc="Compiling the CPU attention kernel (once; cached after)",
                  unit="file", leave=False) as bar:
            build(path)
            bar.update()
    lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JpagedPagedAttention), platform="cpu")


@functools.cache
def available() -> str | None:
    """None if the kernel builds and loads here, else the reason it does not."""
    try:
        load()
    except (KernelBuildError, OSError) as e:
        return str(e)
    return None


def paged_attention(q, k_pool, v_pool, layer, block_tables, context_lens, query_start_loc,
                    scale: float):
    """q [N, heads, head_dim] -> f32 [N, heads, head_dim]: each sequence's new tokens (packed
    by query_start_loc) attend causally to its context through its block table; tokens past
    query_start_loc[-1] get zeros. Pools as the `xla` backend lays them out."""
    load()
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k_pool, v_pool, jnp.asarray(layer, jnp.int32),
                block_tables.astype(jnp.int32), context_lens.astype(jnp.int32),
                query_start_loc.astype(jnp.int32), scale=np.float32(scale))


@dataclasses.dataclass(frozen=True)
class CpuBackend(XlaBackend):
    """The C++ kernel over the `xla` backend's pool; the CPU default when it builds.
    Shapes the kernel does not handle (`supported`) take the `xla` path, same pool."""
    name: str = "cpu"

    def attend(self, q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
        if not supported(k_pool.shape[3], k_pool.shape[4]):
            return super().attend(q, k_pool, v_pool, layer, meta, scale)
        out = paged_attention(q, k_pool, v_pool, layer, meta.block_tables, meta.context_lens,
                              meta.query_start_loc, scale)
        return out.astype(q.dtype)
