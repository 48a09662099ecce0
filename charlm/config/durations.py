"""The durations the train section's time settings accept: 90s, 10m, 2h, 1h30m, or seconds."""

from __future__ import annotations

import re

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_duration(value: str | int | float) -> float:
    """'90s', '10m', '2h', '1h30m' or a plain number of seconds -> seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # YAML gives `0:` as a mapping
        raise ValueError(f"must be a duration such as 90s, 10m or 2h (got {value!r})")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        parts = _DURATION_RE.findall(text)
        if not parts or _DURATION_RE.sub("", text).strip():
            raise ValueError(f"must be a duration such as 90s, 10m or 2h (got {value!r})")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration (got {value!r})")
    return seconds
