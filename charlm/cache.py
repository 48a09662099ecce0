"""Where charlm keeps what it builds once: encoded corpora and the compiled step loop."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$CHARLM_CACHE_DIR, or ~/.cache/charlm."""
    return Path(os.environ.get("CHARLM_CACHE_DIR") or Path.home() / ".cache" / "charlm")
