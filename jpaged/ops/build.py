"""Builds a C++ source of jpaged's CPU kernels into a shared library, once per machine.

Each library is compiled on first use with the system's C++ compiler for this machine's CPU
(`-march=native`) and cached in `utils.cache_root()` under a name hashed from the source,
the compiler flags, the jaxlib version (the FFI headers) and the CPU, so a change to any
of them builds anew. Without a compiler, `KernelBuildError` says so.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from jpaged.exceptions import KernelBuildError
from jpaged.utils import cache_root

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def library_path(source: Path) -> Path:
    """Where the library of `source` is cached for this source, compiler flags, jaxlib and CPU."""
    import jaxlib
    key = hashlib.sha256("\n".join([source.read_text(), " ".join(FLAGS), jaxlib.__version__,
                                    _cpu_id()]).encode()).hexdigest()[:16]
    return cache_root() / f"{source.stem}-{key}.so"


def build(source: Path, path: Path) -> None:
    """Compile `source` to `path` (atomically: concurrent builders don't see half a file)."""
    import jax
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    except OSError as e:
        raise KernelBuildError(f"cannot write the kernel to {path.parent} ({e}); set JPAGED_CACHE_DIR") from e
    os.close(fd)
    cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(source), "-o", tmp]
    try:
        result = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source: Path, what: str) -> ctypes.CDLL:
    """The library of `source`, built first if this machine has none cached (`what` names it
    in the progress bar); raises KernelBuildError."""
    path = library_path(source)
    if not path.exists():
        from tqdm.auto import tqdm
        log.info("compiling %s to %s", source.name, path)
        with tqdm(total=1, desc=f"Compiling the CPU {what} (once; cached after)", unit="file",
                  leave=False) as bar:
            build(source, path)
            bar.update()
    return ctypes.cdll.LoadLibrary(str(path))
