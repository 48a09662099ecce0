"""Fetch a corpus over HTTP(S): streamed, SHA-256 checked, written atomically, never twice.

A known corpus may be several files, each checked, converted into one text file (itself checked)."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from charlm.atomic import atomic_path, write_bytes_atomic
from charlm.data.tang import poems_to_text
from charlm.errors import UserError

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Part:
    """One file to fetch: its path under the corpus's base URL (not yet URL-encoded) and its SHA-256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class KnownCorpus:
    """A public corpus: the files to fetch, each checked, and how they become the one text file written.

    Without `convert` the corpus is its single part, saved as is."""

    about: str
    base_url: str
    parts: tuple[Part, ...]
    filename: str  # written as DIR/NAME/filename
    sha256: str  # of that file
    convert: Callable[[list[Path]], str] | None = None  # local copies of the parts, in order -> the text

    def __post_init__(self):
        assert self.convert is not None or (len(self.parts) == 1 and self.parts[0].sha256 == self.sha256), (
            "a corpus without a converter is its one part, saved as is"
        )

    def urls(self, mirror: str | None = None) -> list[str]:
        """Where the parts are: under `base_url`, or under `mirror` (same paths) when given."""
        base = (mirror or self.base_url).rstrip("/")
        return [f"{base}/{urllib.parse.quote(part.path)}" for part in self.parts]


_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The first ten of the 58 poet.tang.*.json files, 1,000 poems each, pinned to one commit.
_TANG_SHA256 = {
    0: "4f88f429938082523cdc72a1612bd7a7c3e3f7a33f8192c61ae51340efc3c92d",
    1000: "6e703b8d8dcedbd6110f6d48d043665ca2131db2035a5bfcef5e59a19aeb6d75",
    2000: "ec28efa7e2ae9cdbbba09f0ed186e32ccae47a325ad1e5816b7ad56071c1665a",
    3000: "9e4ba2323752b6b9fbdba875cdbc6a26636fe0cabc85fd066370d4915952001f",
    4000: "b8a7946c879b9658a6c667a4c55f776fae7e5e00a17789ab06b274c1429afc66",
    5000: "a0306e6962cff01639ad9a00b042a201b8dec1f30fa5d768a7b112589887861e",
    6000: "982a21d2b15922b406911f1c825785054314c686da86b2155d7aebb362d22771",
    7000: "a6fb69d7b4343c904dc56ae5aae34facc2478d196b51c37ceba9d1e2f171b342",
    8000: "ac3848e95b02736168003863795de4474838c2d6a71a24ca2a4a280ea5177773",
    9000: "b99d6596e3a1fe1a661652383083f92d196b8baf4e461d087081d5e1e1b7a51f",
}

KNOWN_CORPORA = {
    "tinyshakespeare": KnownCorpus(
        about="Tiny Shakespeare (char-rnn), 1.1 MB, public domain",
        base_url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare",
        parts=(Part("input.txt", _SHAKESPEARE_SHA256),),
        filename="input.txt",
        sha256=_SHAKESPEARE_SHA256,
    ),
    "tang_poems": KnownCorpus(
        about="10,008 Tang poems from chinese-poetry's 全唐诗 JSON, one per line, 2.0 MB, public domain (MIT data)",
        base_url="https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/"
        "99ebbef7e1345c0985c44b9fd96a3f9e776f117b",
        parts=tuple(Part(f"全唐诗/poet.tang.{first}.json", sha) for first, sha in _TANG_SHA256.items()),
        filename="tang_poems.txt",
        sha256="5755ffe31af013920043c0551c74e9d2fc2323c23aaf1a2ee92182aebade5eec",
        convert=poems_to_text,
    ),
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


def download(
    url: str,
    out: Path,
    sha256: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 30.0,
) -> Downloaded:
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
    try:
        with atomic_path(out) as tmp:  # removed on any failure, renamed over `out` only when complete and checked
            got = _fetch(url, tmp, progress, timeout)
            if sha256 is not None and got != sha256:
                raise DownloadError(f"{url}: SHA-256 mismatch: expected {sha256}, got {got}; the file was not saved")
    except OSError as err:  # the rename itself (_fetch reports its own errors)
        raise DownloadError(f"cannot write {out}: {err.strerror or err}") from None
    return Downloaded(out, got, fetched=True)


def fetch_known(
    known: KnownCorpus,
    out: Path,
    mirror: str | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Downloaded:
    """Fetch a known corpus into `out`; `progress(part_label, bytes_so_far, total_or_None)` as it goes.

    The parts of a converted corpus go to a temporary folder that is removed whatever happens;
    `out` is written only once every part and the converted text have their expected SHA-256."""
    if out.is_file() and file_sha256(out) == known.sha256:
        return Downloaded(out, known.sha256, fetched=False)
    urls = known.urls(mirror)
    if known.convert is None:
        return download(urls[0], out, known.sha256, _labelled(progress, out.name))
    try:
        with tempfile.TemporaryDirectory(prefix=f"charlm-{out.stem}-") as scratch:
            data = _converted(known, _fetch_parts(known, urls, Path(scratch), progress), out)
    except OSError as err:  # the temporary folder itself (the parts' own writes are DownloadErrors)
        raise DownloadError(f"cannot use a temporary folder for {out.name}: {err.strerror or err}") from None
    _write_atomic(out, data)
    return Downloaded(out, known.sha256, fetched=True)


def _fetch_parts(known: KnownCorpus, urls: list[str], scratch: Path, progress) -> list[Path]:
    paths = []
    for number, (part, url) in enumerate(zip(known.parts, urls), start=1):
        path = scratch / PurePosixPath(part.path).name
        download(url, path, part.sha256, _labelled(progress, f"{path.name} ({number}/{len(urls)})"))
        paths.append(path)
    return paths


def _labelled(progress, label: str):
    return None if progress is None else lambda done, total: progress(label, done, total)


def _converted(known: KnownCorpus, paths: list[Path], out: Path) -> bytes:
    """The converted text as UTF-8, checked against the corpus's SHA-256."""
    assert known.convert is not None, "only a corpus with a converter is converted"
    try:
        data = known.convert(paths).encode("utf-8")
    except ValueError as err:
        raise DownloadError(f"cannot convert the files of {out.name}: {err}; nothing was saved") from None
    got = hashlib.sha256(data).hexdigest()
    if got != known.sha256:
        raise DownloadError(
            f"{out.name}: SHA-256 mismatch after conversion: expected {known.sha256}, got {got}; nothing was saved"
        )
    return data


def _write_atomic(out: Path, data: bytes) -> None:
    """Write through a hidden file in the same folder (charlm.atomic): `out` is never half written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, data)
    except OSError as err:
        raise DownloadError(f"cannot write {out}: {err.strerror or err}") from None


def _fetch(url: str, tmp: Path, progress, timeout: float) -> str:
    """Stream the body into `tmp`, fsynced; returns its SHA-256. Every failure is a DownloadError."""
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as handle:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
            if total is not None and received < total:
                raise DownloadError(
                    f"{url}: the connection dropped after {received:,} of {total:,} bytes; nothing was saved, try again"
                )
            handle.flush()
            os.fsync(handle.fileno())
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot reach {url}: {err.reason} (offline?)") from None
    except (http.client.IncompleteRead, ConnectionError, http.client.HTTPException) as err:
        raise DownloadError(
            f"{url}: the connection dropped after {received:,} bytes ({type(err).__name__}); "
            "nothing was saved, try again"
        ) from None
    except TimeoutError:
        raise DownloadError(f"{url}: no answer within {timeout:.0f} s; nothing was saved, try again") from None
    except ValueError as err:
        raise DownloadError(f"not a URL charlm can fetch: {url} ({err})") from None
    except OSError as err:
        raise DownloadError(f"cannot write {tmp.parent}: {err.strerror or err}") from None
    return digest.hexdigest()
