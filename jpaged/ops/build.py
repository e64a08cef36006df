"""Builds a C++ source of jpaged's CPU kernels into a shared library, once per machine.

Each library is compiled on first use with the system's C++ compiler for this machine's CPU
(`-march=native`, FMA contraction on) and cached in `utils.cache_root()` under a name hashed
from the source, the headers the kernels share (`csrc/vec.h`, `csrc/parallel.h`, on every
kernel's include path), the compiler flags, the jaxlib version (the FFI headers) and the
CPU, so a change to any of them builds anew. Without a compiler, `KernelBuildError` says so. `ffi_library` gives a
kernel module its `load` (build, then register the FFI targets with jax) and `available`.
"""
from __future__ import annotations

import ctypes
import functools
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
INCLUDE_DIR = Path(__file__).with_name("csrc")  # headers the kernels share


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
    headers = [h.read_text() for h in sorted(INCLUDE_DIR.glob("*.h"))]
    key = hashlib.sha256("\n".join([source.read_text(), *headers, " ".join(FLAGS), jaxlib.__version__,
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
    cmd = [compiler, *FLAGS, "-I", str(INCLUDE_DIR), "-isystem", jax.ffi.include_dir(), str(source),
           "-o", tmp]
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


def ffi_library(source: Path, what: str, handlers: dict[str, str]):
    """(load, available) for the kernels of `source`. `load()` builds the library (once per
    machine) and registers each FFI target name -> exported handler symbol of `handlers`
    with jax (raises KernelBuildError); `available()` is None if that works here, else the
    reason it does not. Both are cached (`cache_clear()` to retry)."""
    @functools.cache
    def load() -> None:
        import jax
        lib = load_library(source, what)
        for target, symbol in handlers.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")

    @functools.cache
    def available() -> str | None:
        try:
            load()
        except (KernelBuildError, OSError) as e:
            return str(e)
        return None
    return load, available
