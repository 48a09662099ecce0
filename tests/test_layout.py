"""The package layout holds: imports flow one way between subpackages, and `charlm --help` loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import charlm

PACKAGE = Path(charlm.__file__).parent
SHARED = {"charlm", "charlm.errors", "charlm.config", "charlm.atomic", "charlm.cache", "charlm.hardware"}
# What each subpackage may import besides itself and the shared modules (see each __init__.py).
ALLOWED = {
    "models": set(),
    "data": set(),
    "inference": {"data"},
    "training": {"models", "data", "inference"},
    "report": {"data", "training.rundir", "training.metrics"},
    "config": {"models.registry"},
    "serving": {"data", "inference"},
    "export": {"models", "data", "inference", "training.checkpoint"},
    "tune": {"training.rundir", "training.signals"},
}


def charlm_imports(path: Path) -> set[str]:
    """Every charlm module a file imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("charlm"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("charlm"))
    return found


def allowed(subpackage: str, module: str) -> bool:
    if module in SHARED or module.startswith(f"charlm.{subpackage}"):
        return True
    return any(module == f"charlm.{target}" or module.startswith(f"charlm.{target}.")
               for target in ALLOWED[subpackage])


def test_imports_flow_one_way():
    wrong = []
    for subpackage in ALLOWED:
        for path in sorted((PACKAGE / subpackage).rglob("*.py")):
            wrong += [f"{path.relative_to(PACKAGE)} imports {module}"
                      for module in sorted(charlm_imports(path)) if not allowed(subpackage, module)]
    assert not wrong, "\n".join(wrong)


def test_help_imports_no_torch():
    code = ("import sys; from charlm.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "False", result.stderr
