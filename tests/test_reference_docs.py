"""docs/reference/ is generated from the code: the committed pages match what the script writes,
every config key and every command's option appears in them, and every config key has a description."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main
import yaml
from conftest import load_script

from charlm.cli.commands import build_app
from charlm.config import SECTIONS, validate_config

ROOT = Path(__file__).resolve().parent.parent
HINT = "run `python scripts/reference_docs.py` and commit docs/reference/"


def committed(relative: Path) -> str:
    path = ROOT / relative
    return path.read_text(encoding="utf-8") if path.exists() else ""


def commands(command, path="charlm"):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, f"{path} {name}")


def test_committed_pages_are_what_the_script_writes():
    script = load_script("reference_docs")
    generated = script.pages()
    assert generated == script.pages(), "the reference pages differ between two runs"
    stale = [str(relative) for relative, text in generated.items() if committed(relative) != text]
    assert not stale, f"{', '.join(stale)} out of date: {HINT}"


def test_every_config_key_is_in_the_config_page():
    page = committed(Path("docs/reference/config.md"))
    missing = []
    for section, model in SECTIONS.items():
        heading = f"## `{section}`"
        body = page.split(heading, 1)[1].split("\n## ", 1)[0] if heading in page else ""
        missing += [f"{section}.{name}" for name in model.model_fields if f"| `{name}` |" not in body]
    assert not missing, f"config keys missing from docs/reference/config.md: {', '.join(missing)}; {HINT}"


def test_every_config_key_has_a_description():
    # The Field's own description: a trailing comment or the constraints alone do not count.
    undescribed = [
        f"{section}.{name}"
        for section, model in SECTIONS.items()
        for name, info in model.model_fields.items()
        if len((info.description or "").strip()) < 10
    ]
    assert not undescribed, (
        f"config keys without a description: {', '.join(undescribed)}; give each "
        'Field(..., description="...") (what the key does, for users), then ' + HINT
    )


def test_every_config_section_has_a_docstring():
    bare = [section for section, model in SECTIONS.items() if not (model.__doc__ or "").strip()]
    assert not bare, f"config sections without a docstring (printed under their heading): {', '.join(bare)}"


def test_config_page_links_point_at_pages_of_the_site():
    script = load_script("reference_docs")
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for phrase, target in script.LINKS.items():
        page = target.removeprefix("../")  # from docs/reference/ to the docs/ root
        assert target.startswith("../") and re.search(rf":\s*{re.escape(page)}\s*$", nav, re.MULTILINE), (
            f"{phrase!r} links to {target}, which is not a page in mkdocs.yml's nav"
        )
    # "see the X guide" in a description is a link on the site only if LINKS knows X
    text = " ".join(str(info.description) for model in SECTIONS.values() for info in model.model_fields.values())
    unlinked = set(re.findall(r"[Ss]ee the ([A-Z][\w -]*? (?:guide|page))", text)) - set(script.LINKS)
    assert not unlinked, f"add to LINKS in scripts/reference_docs.py: {', '.join(sorted(unlinked))}"


def test_the_example_config_on_the_page_is_valid():
    script = load_script("reference_docs")
    cfg = validate_config(yaml.safe_load(script.EXAMPLE_CONFIG))
    assert cfg.data.path == "builtin:python-stdlib"


def test_every_command_option_is_in_the_cli_page():
    page = committed(Path("docs/reference/cli.md"))
    missing = []
    for path, command in commands(typer.main.get_command(build_app())):
        heading = f"# `{path}`"
        if path != "charlm" and heading not in page:
            missing.append(path)
            continue
        body = page.split(heading, 1)[-1].split("\n#", 1)[0] if path != "charlm" else page
        for param in command.params:
            for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
                shown = f"`{opt}`" if opt.startswith("-") else f"`{(param.metavar or param.name).upper()}`"
                if path != "charlm" and shown not in body:
                    missing.append(f"{path} {opt}")
    assert not missing, f"missing from docs/reference/cli.md: {', '.join(missing)}; {HINT}"
