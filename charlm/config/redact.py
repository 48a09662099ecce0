"""Credentials out of URIs before they leave the machine (export metadata, sweep records, logs).

A tracking URI such as `https://user:token@mlflow.example` is a secret carrier: whatever is written
next to a model or printed in a report keeps only scheme, host, port, path and harmless query keys.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query keys that carry a secret by convention (presigned URLs, token auth); their values are blanked.
_SECRET_QUERY_WORDS = ("token", "secret", "password", "passwd", "pwd", "key", "auth", "signature", "credential")
REDACTED = "REDACTED"


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_QUERY_WORDS)


def _host_part(netloc: str) -> str:
    # Everything after the last '@' is host[:port]; a password may itself contain '@' or ':'.
    return netloc.rpartition("@")[2]


def redact_uri(uri: str) -> str:
    """`uri` without userinfo (`user:pass@`, `:pass@`, `token@`) and with secret-looking query values blanked.

    A plain path or a string that is not a URI comes back unchanged (a local `mlruns` folder is no secret)."""
    if "://" not in uri:
        # `user:pass@host` without a scheme; an '@' inside a path (after a '/') is left alone.
        before, at, after = uri.rpartition("@")
        return after if at and "/" not in before else uri
    parts = urlsplit(uri)
    netloc = _host_part(parts.netloc)
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(key, REDACTED if _is_secret_key(key) else value) for key, value in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
