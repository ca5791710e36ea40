"""No two npu_ft modules of the launch / CLI layer import each other (issue #12.3), counting the
imports inside functions too: a lazy import still ties the two modules together. Read from the
source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: the modules whose import cycles this test forbids (prefixes)
CHECKED = ("npu_ft.cli", "npu_ft.cli_common", "npu_ft.launch", "npu_ft.device", "npu_ft.train.cli",
           "npu_ft.train.export", "npu_ft.train.export_folder", "npu_ft.train.preflight")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in (ROOT / "npu_ft").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the npu_ft modules it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_launch_and_cli_modules_have_no_import_cycle():
    graph = import_graph()
    assert "npu_ft.launch.plan" in graph["npu_ft.launch.checks"]  # the graph sees relative imports
    bad = [group for group in cycles(graph) if any(m.startswith(CHECKED) for m in group)]
    assert not bad, bad


@pytest.mark.parametrize("module", ["npu_ft.launch.plan", "npu_ft.launch.checks", "npu_ft.launch.torchrun"])
def test_plan_imports_no_other_launch_module(module):
    graph = import_graph()
    if module == "npu_ft.launch.plan":
        assert not {d for d in graph[module] if d.startswith("npu_ft.launch")}
    else:
        assert "npu_ft.launch.plan" in graph[module]
