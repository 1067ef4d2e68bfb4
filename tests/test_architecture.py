"""The code's shape, checked: imports point one way, no cycles, no private names across modules, short
functions (issue 17). Reads the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "workers", "semisam")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, at any depth (lazy imports count)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for target, names in _imports(path):
            if target.split(".")[0] not in PACKAGES:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            edges[mod].update(subs or ([target] if target in MODULES else []))
    return edges


def test_the_library_never_imports_the_actors_or_the_application():
    bad = [(m, t) for m, ts in _project_edges().items() if m.startswith("pipeline") for t in ts
           if t.split(".")[0] in ("workers", "semisam")]
    assert bad == []


def test_the_actors_never_import_the_application():
    bad = [(m, t) for m, ts in _project_edges().items() if m.startswith("workers") for t in ts
           if t.startswith("semisam")]
    assert bad == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles found by a depth-first walk of ``edges`` (module -> modules it imports)."""
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if t == m or t in PACKAGES:  # a package's __init__ holds only a docstring
                continue
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t] if t in stack else [m, t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles():
    assert _cycles(_project_edges()) == []


def test_no_private_names_imported_across_modules():
    bad = [(mod, target, n) for mod, path in MODULES.items() for target, names in _imports(path)
           if target.split(".")[0] in PACKAGES for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == []


@pytest.mark.parametrize("package", ["pipeline", "workers"])
def test_no_function_is_longer_than_sixty_lines(package):
    long = []
    for mod, path in MODULES.items():
        if not mod.startswith(package):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert long == []


def test_the_checker_sees_an_import_cycle():
    """The cycle test can fail: modules importing each other, directly or around three, are found."""
    assert _cycles({"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.a"}}) == [["pipeline.a", "pipeline.b", "pipeline.a"]]
    three = {"pipeline.a": {"pipeline.b"}, "pipeline.b": {"pipeline.c"}, "pipeline.c": {"pipeline.a"}}
    assert len(_cycles(three)) == 1
    assert _cycles({"pipeline.a": {"pipeline.b"}, "pipeline.b": set()}) == []
