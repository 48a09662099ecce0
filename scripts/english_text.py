"""Write Python's Language Reference prose to a UTF-8 file: English text other than Shakespeare that
every Python ships (`pydoc_data.topics`, what `help("if")` shows), so it needs no download.

    python scripts/english_text.py data/python_docs/input.txt

The file holds each help topic in key order, separated by a blank line: about 465,000 characters
on Python 3.11. The topics differ a little between Python versions, so the script prints the
version, the size and the SHA-256 of what it wrote: a figure measured on the file names them.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
from pathlib import Path
from pydoc_data.topics import topics


def english_text() -> str:
    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the text file to write")
    out = parser.parse_args().out
    text = english_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(
        f"{out}: {len(text):,} characters from Python {platform.python_version()}'s pydoc_data.topics "
        f"(sha256 {digest[:16]})"
    )


if __name__ == "__main__":
    main()
