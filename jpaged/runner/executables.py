"""The runner's compiled executables: built ahead of time, kept in a table, saved to disk
(docs/design.md, "Buckets and compilation").

Every executable the runner calls (a step bucket, a sampler variant) is lowered and
compiled explicitly, not through `jax.jit`'s own dispatch cache, so that:

- warm-up compiles without running anything;
- compiles overlap with tracing: Python traces the next executable (holding the GIL)
  while XLA compiles the last one in a worker thread (it releases the GIL);
- a restart loads them from disk: each is serialized under a fingerprint of everything
  that shapes it (jax and jaxlib, the sources compiled into it, the CPU, the model's config and
  parameter shapes), so a warm start skips tracing as well as compiling. XLA's own
  persistent cache is then not used for them (an executable it hands back does not
  serialize whole); it still serves in-memory models, whose code is not in the
  fingerprint.

`num_built()` counts the executables compiled or loaded in this process: none after
warm-up is the "no compilation on the request path" promise, and tests count it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import pathlib
import pickle
import shutil
import threading
import time
from typing import Any, Callable, Hashable, Iterable

import jax

logger = logging.getLogger("jpaged.runner.executables")

# Lowered executable and its compiler options, made on demand
Lower = Callable[[], tuple[Any, dict | None]]

KEEP_FINGERPRINTS = 4  # folders of older fingerprints (other sources, models) are removed

_lock = threading.Lock()
_num_built = 0
_compiling = threading.local()  # per thread: did the compile running here hit XLA's cache?
# Has XLA's persistent cache been consulted in this process (an in-memory model's engine, a
# sharded one, or the user's JAX_COMPILATION_CACHE_DIR)? Then jax's in-process cache may
# hand a later compile of the same computation the executable it read from there, with no
# cache-hit event: from then on nothing is saved (the tables still load what is on disk).
_xla_cache_consulted = False


def _on_event(event: str, **kwargs) -> None:
    global _xla_cache_consulted
    if event == "/jax/compilation_cache/cache_hits":
        _compiling.cache_hit = True
    elif event == "/jax/compilation_cache/compile_requests_use_cache" and \
            jax.config.jax_compilation_cache_dir is not None:  # (the event comes without one too)
        _xla_cache_consulted = True


jax.monitoring.register_event_listener(_on_event)


def num_built() -> int:
    """Executables compiled or loaded from disk so far in this process (all tables)."""
    return _num_built


def _count() -> None:
    global _num_built
    with _lock:
        _num_built += 1


# The packages whose code is compiled into the executables (the model, its attention and
# kernels, the runner's step and sampler); the server's and the engine's code is not.
COMPILED_PACKAGES = ("jpaged.runner", "jpaged.models", "jpaged.attention", "jpaged.ops",
                     "jpaged.pallas_kernels", "jpaged.sampling_params", "jpaged.utils")


def source_fingerprint() -> str:
    """A hash of the sources compiled into executables (Python and C++; `models/` and
    `pallas_kernels/` live outside `jpaged/` in a checkout), jax's versions and this CPU's
    features."""
    import importlib
    import jaxlib
    h = hashlib.sha256()
    for name in COMPILED_PACKAGES:
        path = pathlib.Path(importlib.import_module(name).__file__).resolve()
        files = sorted(path.parent.rglob("*")) if path.name == "__init__.py" else [path]
        for f in files:
            if f.suffix in (".py", ".cc", ".h") and "__pycache__" not in f.parts:
                h.update(f"{name}/{f.relative_to(path.parent)}".encode())
                h.update(f.read_bytes())
    h.update(f"{jax.__version__} {jaxlib.__version__} {jax.default_backend()}".encode())
    h.update(" ".join(sorted({d.device_kind for d in jax.devices()})).encode())
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
        h.update(flags.encode())
    except (OSError, StopIteration):
        import platform
        h.update(platform.processor().encode())
    return h.hexdigest()


class ExecutableTable:
    """Compiled executables by key. `directory` (None: memory only) holds them serialized,
    under `fingerprint`, which must change whenever anything but the key would change them."""

    def __init__(self, directory: str | os.PathLike | None = None, fingerprint: str | None = None):
        self._table: dict[Hashable, Any] = {}
        self.directory = None
        if directory is not None and fingerprint is not None:
            self.directory = pathlib.Path(directory) / fingerprint[:32]
        self.num_loaded = 0
        self._evicted = False  # older fingerprints' folders are removed at the first save

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: Hashable, lower: Lower):
        """The executable for `key`: from the table, from disk, or lowered and compiled now."""
        exe = self._find(key)
        if exe is None:
            exe = self._compile(key, *lower())
        self._table[key] = exe
        return exe

    def build(self, items: Iterable[tuple[Hashable, Lower]], workers: int = 2,
              progress: Callable[[], None] | None = None) -> None:
        """Make sure every (key, lower) is in the table: load what is on disk, and lower the
        rest here while worker threads compile."""
        futures = {}
        with concurrent.futures.ThreadPoolExecutor(max(1, workers), "jpaged-compile") as pool:
            for key, lower in items:
                if key not in futures:
                    exe = self._find(key)
                    if exe is None:
                        futures[key] = pool.submit(self._compile, key, *lower())
                        futures[key].add_done_callback(lambda _: progress and progress())
                        continue
                    self._table[key] = exe
                progress and progress()
            for key, future in futures.items():
                self._table[key] = future.result()

    def _find(self, key: Hashable):
        """The executable for `key` from the table or from disk; None if neither has it."""
        exe = self._table.get(key)
        return exe if exe is not None else self._load(key)

    # ---- compiling, saving, loading -----------------------------------------------------------

    def _compile(self, key: Hashable, lowered, options: dict | None):
        _compiling.cache_hit = False
        exe = lowered.compile(compiler_options=options) if options else lowered.compile()
        _count()
        # An executable XLA's persistent cache handed back serializes without its kernels
        # (jax 0.10: "Function ... not found" when the copy runs), so only fresh ones are
        # saved; the engine keeps XLA's cache off for tables that have a directory.
        if not _compiling.cache_hit and not _xla_cache_consulted:
            self._save(key, exe)
        return exe

    def _path(self, key: Hashable) -> pathlib.Path:
        return self.directory / (hashlib.sha256(repr(key).encode()).hexdigest()[:40] + ".exe")

    def _save(self, key: Hashable, exe) -> None:
        if self.directory is None:
            return
        from jax.experimental import serialize_executable
        try:
            blob = pickle.dumps((repr(key), serialize_executable.serialize(exe)))
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._path(key)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)  # readers see a whole file or none
            if not self._evicted:
                self._evicted = True
                self._evict_old()
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written is only slower
            logger.warning("could not save a compiled executable to %s: %r", self.directory, e)

    def _load(self, key: Hashable):
        if self.directory is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        from jax.experimental import serialize_executable
        try:
            saved_key, (payload, in_tree, out_tree) = pickle.loads(path.read_bytes())
            if saved_key != repr(key):
                return None
            exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # noqa: BLE001 - a stale or broken file: compile instead
            logger.warning("ignoring the saved executable %s: %r", path, e)
            return None
        os.utime(self.directory)
        self.num_loaded += 1
        _count()
        return exe

    def _evict_old(self) -> None:
        """Keep the folders of the KEEP_FINGERPRINTS most recently used fingerprints."""
        parent = self.directory.parent
        os.utime(self.directory)
        folders = sorted((p for p in parent.iterdir() if p.is_dir()),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        for old in folders[KEEP_FINGERPRINTS:]:
            if old != self.directory and time.time() - old.stat().st_mtime > 60:
                shutil.rmtree(old, ignore_errors=True)
