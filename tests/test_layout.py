"""The layout keeps its promises (docs/design.md, "The layout"): imports run one way, the host
side never reaches jax, the repo is self-contained, and docstrings point at sections of the
design doc that exist. Read from the source with `ast`, nothing imported but in subprocesses."""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Installed names of the source roots (pyproject.toml's package-dir).
ROOTS = {"jpaged": ROOT / "jpaged", "jpaged.models": ROOT / "models",
         "jpaged.pallas_kernels": ROOT / "pallas_kernels"}
# Packages from the top of the data flow to the bottom: a module may import its own package
# and the ones after it, never one before (entrypoints -> engine -> runner -> models ->
# attention -> kernels). The command line drives everything, the benchmarks included, which
# drive the entrypoints; `aot` compiles the runner's step.
LAYERS = ["jpaged.cli", "jpaged.benchmarks", "jpaged.entrypoints", "jpaged.engine", "jpaged.aot", "jpaged.runner",
          "jpaged.models", "jpaged.attention", "jpaged.ops", "jpaged.pallas_kernels"]
# The host side: anyone may import it; it imports only itself (never a layer above).
HOST = ["jpaged.core", "jpaged.config", "jpaged.sampling_params", "jpaged.outputs",
        "jpaged.exceptions", "jpaged.utils", "jpaged.version", "jpaged.arg_utils"]


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for name, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = [p for p in f.relative_to(root).with_suffix("").parts if p != "__init__"]
            mods[".".join([name, *parts])] = f
    return mods


def _imports(name: str, path: pathlib.Path, mods) -> set[str]:
    """Project modules `name` imports, at any depth of its code (functions included; not
    under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in mods and t != name}
    return out


def _package(module: str) -> str | None:
    for pkg in sorted(LAYERS + HOST, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


GRAPH = {name: _imports(name, path, m) for m in [_modules()] for name, path in m.items()}


def test_no_import_cycles():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


def test_imports_run_one_way():
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    wrong = []
    for module, deps in GRAPH.items():
        src = _package(module)
        for dep in deps:
            dst = _package(dep)
            if src in HOST and dst not in HOST:
                wrong.append(f"host {module} -> {dep}")
            elif src in rank and dst in rank and rank[dst] < rank[src]:
                wrong.append(f"{module} -> {dep} (upward)")
    assert not wrong, wrong


def test_the_device_side_never_imports_the_scheduler():
    device = [m for m in GRAPH if _package(m) in ("jpaged.runner", "jpaged.models",
                                                  "jpaged.attention", "jpaged.pallas_kernels")]
    allowed = {"jpaged.core.scheduler_output", "jpaged.core.sequence"}  # the contract, plain data
    for module in device:
        core = {d for d in GRAPH[module] if d.startswith("jpaged.core")}
        assert core <= allowed, (module, core - allowed)


def test_host_side_and_the_package_import_no_jax():
    host = sorted(m for m in GRAPH if _package(m) in HOST)
    code = ("import sys, importlib\n"
            f"for m in {host + ['jpaged']!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
            "assert not bad, bad[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_repo_is_self_contained():
    """Nothing refers to files outside the repo (the workloads and GPU targets ship)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    offenders = []
    for rel in files:
        path = ROOT / rel
        if path.suffix not in (".py", ".md", ".toml", ".txt", "") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if re.search(r"\.\./shared|shared/(workloads|gpu_targets|DESIGN)", text) and rel != "tests/test_layout.py":
            offenders.append(rel)
    assert not offenders


def test_docstrings_point_at_sections_that_exist():
    """Every `(docs/design.md, "Section")` reference names a heading of the design doc."""
    headings = {m.strip() for m in re.findall(r"^#+ (.+)$", (ROOT / "docs/design.md").read_text(), re.M)}
    refs = []
    for path in list(ROOT.glob("jpaged/**/*.py")) + list(ROOT.glob("models/*.py")) + \
            list(ROOT.glob("pallas_kernels/*.py")):
        for group in re.findall(r'docs/design\.md,((?:\s*(?:and\s+)?"[^"]+",?)+)', path.read_text()):
            refs += [(path.name, title) for title in re.findall(r'"([^"]+)"', group)]
    assert refs, "docstrings point into docs/design.md"
    missing = [(f, t) for f, t in refs if " ".join(t.split()) not in headings]
    assert not missing, missing


def test_test_modules_have_unique_basenames():
    """pytest's default (prepend) import mode imports each test module by its basename: two
    files of one name in two test folders stop the whole collection (CI failed on it once)."""
    seen: dict[str, pathlib.Path] = {}
    clashes = []
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        if f.name in seen:
            clashes.append(f"{seen[f.name].relative_to(ROOT)} and {f.relative_to(ROOT)}")
        seen.setdefault(f.name, f)
    assert not clashes, f"test modules with one basename: {clashes}"
