"""The layout shows the architecture: no import circle among the project's modules and every import goes downward
(a module imports only from its own layer or a lower one) -- counting every import: module-level, inside functions,
type-only -- and nothing outside backend/ reads the engine's parts."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "flab_kernels", "ui")
INTERNALS = re.compile(r"\bengine\.(allocator|scheduler|metrics|loaded|kv_cache|runner|_requests)\b")

# The allowed direction, lowest layer first: a module belongs to the layer of its longest prefix below, and imports
# only from its own layer or an earlier one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("flab_kernels",)),
    (
        "base",
        ("backend.core.errors", "backend.core.checks", "backend.units", "backend.paths", "backend.core.host_allocator"),
    ),
    (
        "engine core data",
        (
            "backend.core.kv_cache",
            "backend.core.kv_sizing",
            "backend.core.sampling",
            "backend.core.sequence",
            "backend.core.scheduler",
            "backend.core.forward_batch",
            "backend.core.metrics",
            "backend.core.outputs",
            "backend.core.stop",
            "backend.core.detokenizer",
            "backend.core.requests",
            "backend.core.messages",
            "backend.core.streams",
            "backend.core.validation",
            "backend.multimodal",
        ),
    ),
    ("layers", ("backend.layers",)),
    ("options", ("backend.core.config",)),
    ("models", ("backend.models",)),
    ("quantization", ("backend.quantization",)),
    ("loading", ("backend.loading",)),
    (
        "runtime",
        (
            "backend.core.runner",
            "backend.distributed",
            "backend.core.parts",
            "backend.core.readouts",
            "backend.core.engine",
        ),
    ),
    ("public API", ("backend", "backend.remote")),
    (
        "faces and tools",
        (
            "backend.hosting",
            "backend.server",
            "backend.launch_server",
            "backend.tools",
            "backend.distributed.bench",
            "backend.distributed.testing",
        ),
    ),
    ("app", ("ui",)),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> dict[str, int]:
    """Every project module `path` imports (anywhere in the file: module level, functions, TYPE_CHECKING) -> the
    line of the first such import."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in mods:
                found.setdefault(name, node.lineno)
    return found


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer of LAYERS: name its layer"
    return rank


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return cycles


def _graph() -> dict[str, dict[str, int]]:
    mods = _modules()
    return {m: _imports(p, mods) for m, p in mods.items()}


def test_no_import_circle():
    graph = defaultdict(set, {m: set(found) for m, found in _graph().items()})
    assert _cycles(graph) == []


def test_imports_go_downward_only():
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) line {line} imports {target} ({LAYERS[_layer(target)][0]})"
        for m, found in sorted(_graph().items())
        for target, line in found.items()
        if _layer(target) > _layer(m)
    ]
    assert upward == []


def test_every_module_has_a_layer():
    for m in _modules():
        _layer(m)


def test_nothing_outside_backend_reads_the_engines_parts():
    offenders = []
    for folder in ("ui", "examples", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if INTERNALS.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    offenders += [
        f"app.py:{i}: {line.strip()}"
        for i, line in enumerate((ROOT / "app.py").read_text().splitlines(), 1)
        if INTERNALS.search(line)
    ]
    assert offenders == []
