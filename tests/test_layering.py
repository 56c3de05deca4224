"""The package's arrows go one way: layers -> models -> engine -> worker -> trainer -> tune / study.

Read from the source with `ast` (imports inside functions included), so a late import that would
close a cycle is caught as surely as a top-level one. Also: every module stays under the size the
style guide asks for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kn_dist"

# Lower tiers may never import a higher one.
TIERS = ["layers", "models", "engine", "worker", "trainer", "tune", "study"]
MAX_LINES = 420  # STYLE: "under ~400 lines"; a little slack for a docstring


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    package = _module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kn_dist")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("kn_dist"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}
    return found


def _tier(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    head = parts[1]
    if head == "in_process":  # the trainer's one-worker path, below trainer.py itself
        head = "trainer"
    if head in ("tune", "tune_search", "tune_trial"):
        head = "tune"
    if head in ("study", "study_report", "study_selection"):
        head = "study"
    return TIERS.index(head) if head in TIERS else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_arrow_points_up(path):
    own = _tier(_module_name(path))
    if own is None:
        return
    upward = sorted(m for m in _imports(path) if (t := _tier(m)) is not None and t > own)
    assert not upward, f"{path.relative_to(PACKAGE)} (tier {TIERS[own]}) imports higher tiers: {upward}"


def test_no_import_cycles_between_modules():
    modules = {_module_name(p): p for p in SOURCES}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of concern.
    graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it by concern"
