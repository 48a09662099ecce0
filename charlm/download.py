"""Fetch a corpus over HTTP(S): streamed, SHA-256 checked, written atomically, never twice."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from charlm.errors import UserError

_CHUNK = 1 << 16


@dataclass(frozen=True)
class KnownCorpus:
    url: str
    sha256: str
    filename: str
    about: str


KNOWN_CORPORA = {
    "tinyshakespeare": KnownCorpus(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="input.txt",
        about="Tiny Shakespeare (char-rnn), 1.1 MB, public domain"),
}


class DownloadError(UserError):
    """A download that failed; nothing half-written is left behind."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    fetched: bool  # False when a file with the expected hash was already there


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, out: Path, sha256: Optional[str] = None,
             progress: Optional[Callable[[int, Optional[int]], None]] = None, timeout: float = 30.0) -> Downloaded:
    """Fetch `url` into `out`; `progress(bytes_so_far, total_or_None)` is called as it goes."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DownloadError(f"not a URL charlm can fetch: {url} (give an http:// or https:// URL)")
    sha256 = sha256.lower() if sha256 else None
    if sha256 is not None and out.is_file() and file_sha256(out) == sha256:
        return Downloaded(out, sha256, fetched=False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create {out.parent}: {err.strerror or err}") from None
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    try:
        got = _fetch(url, tmp, progress, timeout)
        if sha256 is not None and got != sha256:
            raise DownloadError(f"{url}: SHA-256 mismatch: expected {sha256}, got {got}; the file was not saved")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Downloaded(out, got, fetched=True)


def _fetch(url: str, tmp: Path, progress, timeout: float) -> str:
    """Stream the body into `tmp`, fsynced; returns its SHA-256. Every failure is a DownloadError."""
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as handle:  # noqa: S310
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
            if total is not None and received < total:
                raise DownloadError(f"{url}: the connection dropped after {received:,} of {total:,} bytes; "
                                    "nothing was saved, try again")
            handle.flush()
            os.fsync(handle.fileno())
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot reach {url}: {err.reason} (offline?)") from None
    except (http.client.IncompleteRead, ConnectionError, http.client.HTTPException) as err:
        raise DownloadError(f"{url}: the connection dropped after {received:,} bytes ({type(err).__name__}); "
                            "nothing was saved, try again") from None
    except (socket.timeout, TimeoutError):
        raise DownloadError(f"{url}: no answer within {timeout:.0f} s; nothing was saved, try again") from None
    except ValueError as err:
        raise DownloadError(f"not a URL charlm can fetch: {url} ({err})") from None
    except OSError as err:
        raise DownloadError(f"cannot write {tmp.parent}: {err.strerror or err}") from None
    return digest.hexdigest()
