"""The package's import rules (DESIGN.md): the library imports nothing from its applications,
no two modules import each other (directly or round a cycle), and importing the training
config does not pull in the quickstart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cm3leon

ROOT = Path(cm3leon.__file__).parent
APPLICATIONS = ("cm3leon.cli", "cm3leon.commands", "cm3leon.serve", "cm3leon.quickstart", "cm3leon.report")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every cm3leon module -> the cm3leon modules it imports (at module level or inside functions)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _is_app(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in APPLICATIONS)


def test_the_library_imports_no_application():
    graph = _imports()
    assert "cm3leon.model.io" in graph["cm3leon.pipeline"] and "cm3leon.pipeline" in graph["cm3leon.serve.app"]
    bad = sorted((m, d) for m, deps in graph.items() if not _is_app(m) for d in deps if _is_app(d))
    assert not bad, f"library modules importing applications: {bad}"


def test_no_import_cycles():
    graph = _imports()
    # a package's __init__ may re-export its own submodules: those edges are not cycles of concern
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_importing_the_train_config_does_not_import_the_quickstart():
    code = ("import sys, cm3leon.train.config, cm3leon.train.recipes; "
            "print(sorted(m for m in sys.modules if m.startswith('cm3leon.quickstart')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
