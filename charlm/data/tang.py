"""Tang poems from chinese-poetry's JSON files (《全唐诗》) as plain text: one poem per line.

Each poem is its `paragraphs` joined as stored; title, author and id are dropped; nothing is normalised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def poems_to_text(paths: Sequence[Path]) -> str:
    """The poems of `paths`, in order, one per line with a final newline; ValueError if a file is malformed."""
    bodies = [body for path in paths for body in _poem_bodies(path)]
    if not bodies:
        raise ValueError("the files hold no poem with text")
    return "\n".join(bodies) + "\n"


def _poem_bodies(path: Path) -> list[str]:
    """Each poem's text, skipping poems without any; duplicates stay (they are in the source)."""
    try:
        poems = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path.name} is not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(poems, list):
        raise ValueError(f"{path.name} is not a JSON array of poems")
    bodies = []
    for index, poem in enumerate(poems):
        paragraphs = poem.get("paragraphs") if isinstance(poem, dict) else None
        if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
            raise ValueError(f"{path.name}: poem {index} has no 'paragraphs' list of strings")
        body = "".join(paragraphs)
        if body:  # an empty poem would be an empty line, i.e. no document at all
            bodies.append(body)
    return bodies
