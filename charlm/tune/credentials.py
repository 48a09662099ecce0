"""What a sweep keeps out of sight: a storage URL's password in the lines it prints, and every
credential of a trial's config (train.mlflow_uri's `user:token@`, a `?password=`) out of the
study database, which other workers, dashboards and copies of the file all read. The trainer
itself still gets the full config, in its run dir's trial.yaml."""

from __future__ import annotations

import copy
import re
from typing import Any, TypeGuard

from charlm.config import redact_uri

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def hide_password(url: str) -> str:
    """`url` as a message may show it: the user kept (it says whose study), the password as ***,
    secret query values blanked. `user@` alone has nothing to hide."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")  # a password may itself hold '@'
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***@" if colon else (f"{userinfo}@" if at else "")
    tail = rest[end:]
    if "?" in tail:  # redact_uri knows which query keys carry secrets
        tail = redact_uri(f"{scheme}://{host}{tail}").split("://", 1)[1][len(host) :]
    return f"{scheme}://{shown}{host}{tail}"


def carries_credentials(value: Any) -> TypeGuard[str]:
    """Whether a config value is a URI with userinfo or a secret query value."""
    return isinstance(value, str) and "://" in value and redact_uri(value) != value


def without_credentials(config: dict) -> dict:
    """A copy of a config (as a dict) fit for the study database: each URI value without credentials."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: clean(v) for key, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return redact_uri(value) if carries_credentials(value) else value

    return clean(copy.deepcopy(config))


def with_credentials(stored: dict, base: dict) -> dict:
    """A stored config with the credentials `base` gives the same URIs put back (for best.yaml,
    which must train as the trial did). A URI the base does not hold stays as stored."""
    restored = copy.deepcopy(stored)
    for section, values in restored.items():
        given = base.get(section)
        if not isinstance(values, dict) or not isinstance(given, dict):
            continue
        for key, value in values.items():
            full = given.get(key)
            if carries_credentials(full) and redact_uri(full) == value:
                values[key] = full
    return restored


def redact_message(text: str) -> str:
    """A message (a trainer's error line) with the credentials of each URI in it removed."""
    return _URI.sub(lambda match: redact_uri(match.group(0)), text)
