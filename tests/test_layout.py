"""The layout shows the architecture: no import circle among the project's modules (module-level imports, type-only
imports left out), and nothing outside backend/ reads the engine's parts."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "flab_kernels", "ui")
INTERNALS = re.compile(r"\bengine\.(allocator|scheduler|metrics|loaded|kv_cache|runner|_requests)\b")


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions run late
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in mods:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
    return found


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


def test_no_import_circle():
    mods = _modules()
    graph = defaultdict(set, {m: _imports(p, mods) for m, p in mods.items()})
    assert _cycles(graph) == []


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
