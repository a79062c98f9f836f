"""The layout's one direction of imports, read from the source (ast), not from what happens to be loaded.

- A service (gateway, scheduler, stage_worker, draft_worker) imports only shared/ and itself.
- shared/ imports only itself.
- The composition layer (specpipe/) may import every service, never benchmarks/.
- No import circle between modules of the project, nor between its packages. Imports inside functions count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("gateway", "scheduler", "stage_worker", "draft_worker")
PACKAGES = (*SERVICES, "shared", "specpipe", "benchmarks")
ALLOWED = {  # package -> the other project packages it may import
    **{s: {"shared"} for s in SERVICES},
    "shared": set(),
    "specpipe": {"shared", *SERVICES},
    "benchmarks": {"shared", "specpipe", *SERVICES},
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules that `path` imports (absolute imports; `from pkg import name` counts as pkg.name if that
    is a module, else pkg)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {mod: {m for m in _imports(path) if m in files and m != mod} for mod, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for root in graph:
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
            elif colour[child] == 1:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_services_depend_only_on_shared() -> None:
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in _graph().items()
        for dep in deps
        if dep.split(".")[0] != mod.split(".")[0] and dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_modules() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_import_circle_between_packages() -> None:
    packages: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for mod, deps in _graph().items():
        packages[mod.split(".")[0]].update(d.split(".")[0] for d in deps if d.split(".")[0] != mod.split(".")[0])
    cycle = _cycle(packages)
    assert cycle is None, " -> ".join(cycle)


# label: (graph, has a cycle)
CYCLES = {
    "a chain": ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    "a self-contained loop": ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    "a diamond": ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, False),
}


@pytest.mark.parametrize("case", list(CYCLES))
def test_cycle_finder(case) -> None:
    graph, has_cycle = CYCLES[case]
    assert (_cycle(graph) is not None) == has_cycle


def test_every_python_m_in_the_docs_and_build_files_exists() -> None:
    """`python -m X` in the Makefile, compose file, Dockerfile and README names a module that is there."""
    import importlib.util
    import re

    named = set()
    for name in ("Makefile", "docker-compose.yml", "Dockerfile", "README.md", ".ci/run"):
        text = (ROOT / name).read_text()
        named.update(re.findall(r'python"?,? +"?-m"?,? +"?([A-Za-z_][\w.]*)', text))
    project = sorted(m for m in named if m.split(".")[0] in PACKAGES)
    assert project, "no `python -m` found: the pattern no longer matches"
    missing = [m for m in project if importlib.util.find_spec(m) is None]
    assert not missing, missing
