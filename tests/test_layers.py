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
