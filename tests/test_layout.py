"""The package's rooms do not leak: no import cycle between lorareg's modules, no hidden (function-local)
imports of lorareg's own modules, and the library never imports the apps (CLI, Action, demo)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorareg"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _target(node: ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The lorareg modules an ``from X import a, b`` statement loads (X itself, and a/b where they are modules)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if not (name == "lorareg" or name.startswith("lorareg.")):
        return []
    submodules = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known]
    # `from pkg import submodule` needs the submodule, not what pkg/__init__ defines
    return submodules if len(submodules) == len(node.names) else [name, *submodules]


def _imports(known: dict[str, Path]):
    """(module -> lorareg modules imported at module level, function-local imports of lorareg modules)."""
    graph: dict[str, set[str]] = {}
    local: list[str] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_package = path.name == "__init__.py"
        graph[name] = set()
        top_level = set()
        for node in tree.body:
            nodes = [node]
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not run
                continue
            for n in nodes:
                if isinstance(n, ast.ImportFrom):
                    graph[name].update(_target(n, name, is_package, set(known)))
                    top_level.add(id(n))
                elif isinstance(n, ast.Import):
                    graph[name].update(a.name for a in n.names if a.name.startswith("lorareg"))
                    top_level.add(id(n))
        for n in ast.walk(tree):
            if id(n) in top_level:
                continue
            if isinstance(n, ast.ImportFrom) and _target(n, name, is_package, set(known)):
                local.append(f"{name}:{n.lineno} from {'.' * n.level}{n.module or ''}")
            elif isinstance(n, ast.Import) and any(a.name.startswith("lorareg") for a in n.names):
                local.append(f"{name}:{n.lineno} import {n.names[0].name}")
    # importing a.b.c runs a/__init__ and a/b/__init__ first, except those the importer is already inside
    for name in graph:
        graph[name] = (graph[name] | {p for dep in graph[name] for p in _parents(dep, known) if not name.startswith(p + ".")}) - {name}
    return graph, local


def _parents(name: str, known) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known]


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_cycle_between_lorareg_modules():
    graph, _ = _imports(_modules())
    cycle = _cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_no_module_imports_the_top_level_package():
    graph, _ = _imports(_modules())
    offenders = sorted(m for m, deps in graph.items() if "lorareg" in deps and m != "lorareg")
    assert not offenders, f"these import `lorareg` itself (an import cycle through __init__): {offenders}"


def test_no_function_local_imports_of_lorareg_modules():
    _, local = _imports(_modules())
    assert not local, "function-local imports hide the dependency graph:\n" + "\n".join(local)


def test_the_library_never_imports_the_apps():
    graph, _ = _imports(_modules())
    offenders = sorted(m for m, deps in graph.items()
                       if not m.startswith("lorareg.apps") and m != "lorareg" and any(d.startswith("lorareg.apps") for d in deps))
    assert not offenders, offenders


def test_the_checker_sees_a_cycle():
    """The cycle finder itself: a planted cycle is found."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []
