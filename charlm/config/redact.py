"""Credentials out of URIs before they leave the machine (export metadata, sweep records, logs).

A tracking URI such as `https://user:token@mlflow.example` is a secret carrier: whatever is written
next to a model or printed in a report keeps only scheme, host, port, path and harmless query keys.
"""

from __future__ import annotations

import re

# Query keys that carry a secret by convention (presigned URLs, token auth); their values are blanked.
_SECRET_QUERY = re.compile(
    r"([?&;][^=&;#]*(?:token|secret|password|passwd|pwd|key|auth|signature|credential)[^=&;#]*=)"
    r"[^&;#]*",
    re.IGNORECASE,
)
REDACTED = "REDACTED"


def redact_uri(uri: str) -> str:
    """`uri` without userinfo (`user:pass@`, `:pass@`, `token@`) and with secret-looking query values blanked.

    Cut by hand, not rebuilt by urllib: the rest of the URI (`sqlite:////abs/path`) stays byte for byte.
    A plain path or a name that is not a URI comes back unchanged (a local `mlruns` folder is no secret)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        # Everything after the last '@' is host[:port]; a password may itself hold '@' or ':'.
        uri = f"{scheme}://{rest[:authority_end].rpartition('@')[2]}{rest[authority_end:]}"
    else:
        # `user:pass@host` without a scheme; an '@' inside a path (after a '/') is left alone.
        before, at, after = uri.rpartition("@")
        if at and "/" not in before:
            uri = after
    return _SECRET_QUERY.sub(lambda match: match.group(1) + REDACTED, uri)
