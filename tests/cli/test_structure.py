"""The command line's shape holds: one command table, the library imported through one module, and
the few imports left inside functions each saying why."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
import typer

import charlm.cli
from charlm.cli import library
from charlm.cli.commands import COMMANDS, Group, build_app

CLI = Path(charlm.cli.__file__).parent


def type_checking_imports(tree: ast.Module) -> dict[str, tuple[str, ...]]:
    """module -> names, as imported under `if TYPE_CHECKING:`."""
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {
        node.module: tuple(alias.name for alias in node.names)
        for node in block.body
        if isinstance(node, ast.ImportFrom) and node.module
    }


def test_the_lazy_library_lists_the_same_names_for_the_type_checker_and_at_run_time():
    tree = ast.parse((CLI / "library.py").read_text(encoding="utf-8"))
    assert type_checking_imports(tree) == library.LAZY


@pytest.mark.slow  # imports the whole library, extras included (mypy checks the same names in the fast lane)
def test_every_lazy_name_is_in_its_module():
    """A library function renamed or moved is found here, not by the first user of the command."""
    missing = [
        f"{module}.{name}"
        for module, names in library.LAZY.items()
        for name in names
        if not hasattr(importlib.import_module(module), name)
    ]
    assert not missing


def test_an_unknown_lazy_name_is_an_attribute_error():
    try:
        library.no_such_function  # noqa: B018 - the lookup itself is what is tested
    except AttributeError as err:
        assert "add it to LAZY" in str(err)
    else:
        raise AssertionError("no AttributeError")


def test_the_app_has_the_table_s_commands_in_its_order():
    """Typer lists groups after single commands: the table keeps them at its end, so it reads as --help does."""
    kinds = [isinstance(command, Group) for command in COMMANDS.values()]
    assert kinds == sorted(kinds)
    click_group = typer.main.get_command(build_app())
    assert list(click_group.list_commands(None)) == list(COMMANDS)
    for name, command in COMMANDS.items():
        if isinstance(command, Group):
            sub = click_group.get_command(None, name)
            assert list(sub.list_commands(None)) == list(command.commands)


def test_command_modules_register_nothing_themselves():
    """Commands are plain functions; only commands.py builds the app."""
    for path in sorted(CLI.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name != "commands.py":
            assert "typer.Typer(" not in text and ".command(" not in text, path.name


def test_imports_inside_functions_are_few_and_each_says_why():
    sites = []
    for path in sorted(CLI.glob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "PLC0415" in line:
                sites.append(line)
                assert re.search(r"noqa: PLC0415 - \S", line), f"{path.name}: {line.strip()}"
    assert len(sites) <= 3, sites
