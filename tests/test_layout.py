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
# charlm.store (run dir, checkpoint files, metrics.jsonl) sits below everything that reads a run's
# files: none of them imports training to read one.
ALLOWED = {
    "models": set(),
    "data": set(),
    "store": {"models", "data"},
    "inference": {"data"},
    "training": {"models", "data", "store", "inference"},
    "report": {"data", "store"},
    "config": {"models.registry"},
    "serving": {"data", "inference", "store"},
    "export": {"models", "data", "inference", "store"},
    "tune": {"store.rundir", "store.metrics", "training.signals"},
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
    return any(module == f"charlm.{target}" or module.startswith(f"charlm.{target}.") for target in ALLOWED[subpackage])


def test_imports_flow_one_way():
    wrong = []
    for subpackage in ALLOWED:
        for path in sorted((PACKAGE / subpackage).rglob("*.py")):
            wrong += [
                f"{path.relative_to(PACKAGE)} imports {module}"
                for module in sorted(charlm_imports(path))
                if not allowed(subpackage, module)
            ]
    assert not wrong, "\n".join(wrong)


HELP_CALLS = """
import sys
from charlm.cli import main
from charlm.cli.commands import COMMANDS, Group
calls = [["--help"], ["sample", "--no-such-option"]]
for name, command in COMMANDS.items():
    calls.append([name, "--help"])
    if isinstance(command, Group):
        calls += [[name, sub, "--help"] for sub in command.commands]
for argv in calls:
    try:
        main(argv)
    except SystemExit:
        pass
print(len(calls), "torch" in sys.modules, file=sys.stderr)
"""


def test_help_imports_no_torch():
    """`charlm --help`, every command's --help and a mistyped option answer without loading torch."""
    result = subprocess.run([sys.executable, "-c", HELP_CALLS], capture_output=True, text=True, timeout=120)
    calls, torch_loaded = result.stderr.strip().splitlines()[-1].split()
    assert int(calls) > 10 and torch_loaded == "False", result.stderr


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the charlm modules it imports (a `from package import module` names the module)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("charlm"):
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in paths}
        graph[name] = {module for module in found if module in paths and module not in (name, "charlm")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    """Type-only imports count too: a module that needs another's type to be read is tied to it."""
    assert circles(import_graph()) == []


def test_modules_stay_small():
    """A module over 300 lines does two jobs (house style): split it where the seam is."""
    long = [
        f"{path.relative_to(PACKAGE)}: {n} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > 300
    ]
    assert not long, "\n".join(long)
