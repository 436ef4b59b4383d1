"""The layering holds: no import cycle among the project's modules, and no project import hidden in a function.

The layers themselves (wanport > parity > jax_impl | torch_ref > weights | kernels, and weights free of
jax/flax/torch) are import-linter contracts in pyproject.toml, checked by `lint-imports` in .ci/run; this
file checks what those contracts do not: cycles at module level, and imports inside function bodies, which
hide dependencies from readers and from the contracts' authors. Function-level imports of the project's own
modules are allowed only in the command modules (wanport/: `wanport --help` must not start jax or torch) and
in the modules `HIDDEN_LEFT` names (none today).
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wanport", "parity", "jax_impl", "torch_ref", "weights", "kernels")

# module file -> function-level project imports still allowed there (a ratchet: hoist them, lower the number,
# never raise it). Empty since 2026-11-25: every project import outside wanport/ is at module level.
HIDDEN_LEFT: dict[str, int] = {}


def find_cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle among the graph's modules (as a closed path), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph.modules):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


# import edges that close a cycle today, each with why it is tolerated (remove an entry once it is fixed)
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()  # none left: keep it so (an entry needs a written reason)


def test_no_import_cycle():
    graph = _graph()
    for importer, imported in KNOWN_CYCLE_EDGES:
        assert graph.direct_import_exists(importer=importer, imported=imported), f"{importer} -> {imported} is gone: " \
            "drop it from KNOWN_CYCLE_EDGES"
        graph.remove_import(importer=importer, imported=imported)
    assert find_cycle(graph) is None


def test_a_planted_cycle_is_found():
    graph = _graph()
    graph.add_import(importer="weights.configs.base", imported="parity.report")  # parity.report -> weights.atomic...
    graph.add_import(importer="weights.atomic", imported="weights.configs.base")
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def hidden_imports(path: Path) -> list[str]:
    """Project modules imported inside function bodies of `path`."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [n for n in names if n.split(".")[0] in PACKAGES]
    return found


def test_no_new_project_imports_inside_functions():
    over = {}
    for package in PACKAGES:
        if package == "wanport":
            continue  # the command line: lazy on purpose, each with its measured reason
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            n = len(hidden_imports(path))
            if n > HIDDEN_LEFT.get(rel, 0):
                over[rel] = (n, HIDDEN_LEFT.get(rel, 0))
    assert not over, f"project imports inside functions (found, allowed): {over}; import at module level"


def test_a_planted_hidden_import_is_found(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import numpy as np\n\ndef f():\n    from weights.atomic import atomic_write\n    import os\n")
    assert hidden_imports(path) == ["weights.atomic"]
