"""The package shows its two layers: kdsweep.core (training, no Optuna) and kdsweep.service."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "kdsweep" / "core"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_never_imports_optuna_or_the_service() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 10, "the check looks in the wrong place"
    for path in files:
        for name in _imports(path):
            assert not name.startswith("optuna"), f"{path.name} imports {name}"
            assert not name.startswith("kdsweep.service"), f"{path.name} imports {name}"
            assert name != "kdsweep.cli", f"{path.name} imports the CLI"


def test_importing_every_core_module_loads_no_optuna() -> None:
    mods = ", ".join(f"kdsweep.core.{p.stem}" for p in sorted(CORE.glob("*.py")) if p.stem != "__init__")
    code = f"import sys, {mods}; sys.exit('optuna' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def _graph() -> dict[str, set[str]]:
    """Module -> the kdsweep modules it imports, at the top or inside functions (not those
    under `if TYPE_CHECKING:`, which only a type checker reads)."""
    graph: dict[str, set[str]] = {}
    package = ROOT / "kdsweep"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in package.rglob("*.py")}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        deps = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree)
                       if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdsweep"):
                for alias in node.names:  # `from kdsweep.core import data` names a module
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("kdsweep"))
        graph[name] = {d for d in deps if d in modules and d != name and not d.endswith("__init__")}
    return graph


def test_no_import_circles() -> None:
    graph = _graph()
    assert "kdsweep.core.train" in graph, "the check looks in the wrong place"
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
