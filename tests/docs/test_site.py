"""The docs site builds with `mkdocs build --strict` (a broken link, a missing anchor or a page left out of the
nav fails), and the front page stays a front page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 220


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "zh" / "learning-path" / "index.html").exists()


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/"


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "CHANGELOG.md"])
def test_the_root_pages_link_to_files_that_exist(page):
    """mkdocs checks the site's links; these pages sit outside it, so their relative links are checked here."""
    text = (ROOT / page).read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = [
        target
        for target in targets
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
        if not (ROOT / target.split("#")[0]).exists()
    ]
    assert not missing, f"{page} links to files that do not exist: {missing}"


def package_tree_entries() -> set[str]:
    """The files docs/internals/architecture.md's package tree names, as paths (two spaces of indent a folder)."""
    text = (ROOT / "docs" / "internals" / "architecture.md").read_text(encoding="utf-8")
    tree = text.split("```text\ncharlm/\n", 1)[1].split("```", 1)[0]
    folders, listed = ["charlm/"], set()
    for line in tree.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        folders = folders[:depth] + [name]
        if not name.endswith("/"):
            listed.add("".join(folders))
    return listed


def test_the_package_tree_lists_every_module():
    real = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "charlm").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".so", ".pyc"}
    }
    listed = package_tree_entries()
    assert not real - listed, f"docs/internals/architecture.md's tree lacks {sorted(real - listed)}"
    assert not listed - real, (
        f"docs/internals/architecture.md's tree names files that do not exist: {sorted(listed - real)}"
    )
