"""The docs work as written: every bash block of README.md and of every page under docs/ is marked runnable or says
why not, the front page's and quick start's runnable blocks cover download, train, sample and eval, and (slow) every
runnable block of the pages in PAGES runs, on tiny data (scripts/run_doc_blocks.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script, needs_shared_data

ROOT = Path(__file__).resolve().parents[2]
FRONT = [ROOT / "README.md", ROOT / "docs" / "quickstart.md"]
GUIDES = ["training", "data", "sampling", "evaluation", "fine-tuning", "visualisation", "tracking", "export"]
PAGES = [
    *FRONT,
    *(ROOT / "docs" / "guide" / f"{name}.md" for name in GUIDES),
    ROOT / "docs" / "learning-path.md",
    ROOT / "docs" / "zh" / "learning-path.md",
]
# Every page a reader sees; docs/reference/ is generated from the code and holds no bash blocks.
DOCS = ROOT / "docs"
ALL_PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.glob("**/*.md") if p.parent != DOCS / "reference")]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_bash_block_is_marked(page):
    script = load_script("run_doc_blocks")
    script.blocks(page)  # raises MarkingError on a block with neither marking


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_pages_run_have_runnable_blocks(page):
    script = load_script("run_doc_blocks")
    assert any(block.runnable for block in script.blocks(page)), f"{page.name} has no runnable bash blocks"


def test_the_generated_reference_has_no_bash_blocks():
    script = load_script("run_doc_blocks")
    for page in (DOCS / "reference").glob("**/*.md"):
        assert script.blocks(page) == [], f"{page.name} has bash blocks, which the marking test skips"


def test_an_unmarked_block_is_refused(tmp_path):
    script = load_script("run_doc_blocks")
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```bash\ncharlm train --config x.yaml\n```\n", encoding="utf-8")
    with pytest.raises(script.MarkingError, match=r"page.md:3: a bash block needs"):
        script.blocks(page)
    page.write_text("<!-- not runnable: a server -->\n```bash\ncharlm serve\n```\n", encoding="utf-8")
    assert [b.runnable for b in script.blocks(page)] == [False]


@pytest.mark.parametrize("page", FRONT, ids=lambda p: p.name)
def test_the_runnable_blocks_cover_the_main_job(page):
    script = load_script("run_doc_blocks")
    runnable = "\n".join(block.text for block in script.blocks(page) if block.runnable)
    for command in ("charlm download", "charlm train", "charlm sample", "charlm eval"):
        assert command in runnable, f"no runnable block of {page.name} runs {command}"


@pytest.mark.slow
@needs_shared_data(SHAKESPEARE)
def test_the_runnable_blocks_run_as_written(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_doc_blocks.py"), "--workdir", str(tmp_path)]
        + [str(page) for page in PAGES],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
