"""charlm download against an HTTP server on 127.0.0.1 that the test starts."""

from __future__ import annotations

import hashlib
import http.server
import json
import tempfile
import threading
import urllib.parse

import pytest
from conftest import assert_user_error, call

import charlm.data.download as download_module
from charlm.data.download import KnownCorpus, Part
from charlm.data.tang import poems_to_text

BODY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 400).encode()
GOOD_SHA = hashlib.sha256(BODY).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    requests = 0
    files: dict[str, bytes] = {}  # more files to serve, by their decoded path

    def do_GET(self):
        type(self).requests += 1
        path = urllib.parse.unquote(self.path)
        if path in self.files:
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.files[path])))
            self.end_headers()
            self.wfile.write(self.files[path])
        elif self.path == "/input.txt":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/drop":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:1000])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection dies mid-body
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_known_corpus_is_fetched_checked_and_not_fetched_twice(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        download_module.KNOWN_CORPORA,
        "tinyshakespeare",
        KnownCorpus("test", server, (Part("input.txt", GOOD_SHA),), "input.txt", GOOD_SHA),
    )
    monkeypatch.setattr("charlm.cli.files.KNOWN_CORPORA", download_module.KNOWN_CORPORA)
    code, out, err = call(capsys, "download", "tinyshakespeare", "--dir", str(tmp_path))
    assert code == 0, err
    path = tmp_path / "tinyshakespeare" / "input.txt"
    assert out.strip() == str(path) and path.read_bytes() == BODY
    before = Handler.requests
    code, out, err = call(capsys, "download", "tinyshakespeare", "--dir", str(tmp_path))
    assert code == 0 and "nothing downloaded" in err and Handler.requests == before


def test_real_tinyshakespeare_entry():
    known = download_module.KNOWN_CORPORA["tinyshakespeare"]
    assert known.urls()[0].startswith("https://raw.githubusercontent.com/karpathy/char-rnn/")
    assert known.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_real_tang_poems_entry():
    """Ten parts in numeric order, pinned to one commit, the path percent-encoded as UTF-8."""
    known = download_module.KNOWN_CORPORA["tang_poems"]
    commit = "99ebbef7e1345c0985c44b9fd96a3f9e776f117b"
    assert [p.path for p in known.parts] == [f"全唐诗/poet.tang.{n}.json" for n in range(0, 10_000, 1000)]
    assert known.urls()[0] == (
        f"https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/{commit}/"
        "%E5%85%A8%E5%94%90%E8%AF%97/poet.tang.0.json"
    )
    assert (
        known.urls("http://mirror.example/x/")[9]
        == "http://mirror.example/x/%E5%85%A8%E5%94%90%E8%AF%97/poet.tang.9000.json"
    )
    assert len({p.sha256 for p in known.parts}) == 10 and known.convert is poems_to_text
    assert known.filename == "tang_poems.txt"
    assert known.sha256 == "5755ffe31af013920043c0551c74e9d2fc2323c23aaf1a2ee92182aebade5eec"


# Three tiny files in chinese-poetry's format: an empty poem (skipped), a duplicate (kept), an astral character.
TANG_SAMPLE = {
    "全唐诗/poet.tang.0.json": [
        {"author": "孟浩然", "paragraphs": ["春眠不覺曉，", "處處聞啼鳥。"], "title": "春曉", "id": "a"},
        {"author": "佚名", "paragraphs": [], "title": "無", "id": "b"},
        {"author": "佚名", "paragraphs": ["", ""], "title": "空", "id": "c"},
    ],
    "全唐诗/poet.tang.1000.json": [
        {"author": "佚名", "paragraphs": ["𠀀字□，", "[其]一。"], "title": "𠀁", "id": "d"},
        {"author": "孟浩然", "paragraphs": ["春眠不覺曉，", "處處聞啼鳥。"], "title": "春曉", "id": "e"},
    ],
    "全唐诗/poet.tang.2000.json": [
        {"author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。"], "title": "登鸛雀樓", "id": "f"},
    ],
}
TANG_TEXT = "春眠不覺曉，處處聞啼鳥。\n𠀀字□，[其]一。\n春眠不覺曉，處處聞啼鳥。\n白日依山盡，黃河入海流。\n"


def serve_tang(monkeypatch, files: dict[str, bytes], text_sha: str = sha(TANG_TEXT.encode())) -> None:
    """Serve `files` under /mirror/ and register a `tang_poems` made of them (its usual base URL unreachable)."""
    for path, data in files.items():
        monkeypatch.setitem(Handler.files, f"/mirror/{path}", data)
    parts = tuple(Part(path, sha(data)) for path, data in files.items())
    known = KnownCorpus("test", "http://127.0.0.1:1/unused", parts, "tang_poems.txt", text_sha, poems_to_text)
    monkeypatch.setitem(download_module.KNOWN_CORPORA, "tang_poems", known)


def encoded_sample() -> dict[str, bytes]:
    return {path: json.dumps(poems, ensure_ascii=False, indent=4).encode() for path, poems in TANG_SAMPLE.items()}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """The temporary folder the parts go to, so a test can see that it is cleaned up."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_tang_poems_are_fetched_converted_and_not_fetched_twice(server, tmp_path, scratch, capsys, monkeypatch):
    serve_tang(monkeypatch, encoded_sample())
    args = ["download", "tang_poems", "--dir", str(tmp_path / "data"), "--mirror", f"{server}/mirror/"]
    code, out, err = call(capsys, *args)
    assert code == 0, err
    path = tmp_path / "data" / "tang_poems" / "tang_poems.txt"
    assert out.strip() == str(path) and path.read_bytes() == TANG_TEXT.encode("utf-8")
    assert list(path.parent.iterdir()) == [path] and list(scratch.iterdir()) == []  # no part, no temporary file
    before = Handler.requests
    code, out, err = call(capsys, *args)
    assert code == 0 and "nothing downloaded" in err and Handler.requests == before


@pytest.mark.parametrize(
    "change,fragment",
    [
        ("wrong part hash", "poet.tang.1000.json: SHA-256 mismatch: expected 000"),
        ("missing part", "poet.tang.2000.json: HTTP 404"),
        ("not JSON", "cannot convert the files of tang_poems.txt: poet.tang.1000.json is not valid JSON"),
        ("not poems", "poet.tang.1000.json: poem 0 has no 'paragraphs' list of strings"),
        ("wrong text hash", "tang_poems.txt: SHA-256 mismatch after conversion"),
    ],
)
def test_tang_failures_leave_nothing_behind(server, tmp_path, scratch, capsys, monkeypatch, change, fragment):
    files = encoded_sample()
    if change == "not JSON":
        files["全唐诗/poet.tang.1000.json"] = b'[{"paragraphs": ["'
    if change == "not poems":
        files["全唐诗/poet.tang.1000.json"] = b'[{"title": "x"}]'
    serve_tang(monkeypatch, files, "0" * 64 if change == "wrong text hash" else sha(TANG_TEXT.encode()))
    known = download_module.KNOWN_CORPORA["tang_poems"]
    if change == "wrong part hash":
        parts = known.parts[:1] + (Part(known.parts[1].path, "0" * 64),) + known.parts[2:]
        monkeypatch.setitem(
            download_module.KNOWN_CORPORA,
            "tang_poems",
            KnownCorpus("test", known.base_url, parts, known.filename, known.sha256, known.convert),
        )
    if change == "missing part":
        monkeypatch.delitem(Handler.files, "/mirror/全唐诗/poet.tang.2000.json")
    folder = tmp_path / "data"
    assert_user_error(
        call(capsys, "download", "tang_poems", "--dir", str(folder), "--mirror", f"{server}/mirror"), fragment
    )
    assert not folder.exists() and list(scratch.iterdir()) == []


def test_any_url_with_and_without_a_hash(server, tmp_path, capsys):
    out_file = tmp_path / "x.txt"
    code, out, err = call(capsys, "download", "--url", f"{server}/input.txt", "--out", str(out_file))
    assert code == 0 and out_file.read_bytes() == BODY
    assert f"its SHA-256 is {GOOD_SHA}" in err and "warning" in err
    code, out, err = call(
        capsys, "download", "--url", f"{server}/input.txt", "--sha256", GOOD_SHA.upper(), "--out", str(out_file)
    )
    assert code == 0 and "nothing downloaded" in err


@pytest.mark.parametrize(
    "path,sha,fragment",
    [
        ("/input.txt", "0" * 64, "SHA-256 mismatch: expected 000"),
        ("/missing", None, "HTTP 404 Not Found"),
        ("/drop", None, "the connection dropped after"),
    ],
)
def test_failures_leave_nothing_behind(server, tmp_path, capsys, path, sha, fragment):
    out_file = tmp_path / "sub" / "x.txt"
    args = ["download", "--url", f"{server}{path}", "--out", str(out_file)] + (["--sha256", sha] if sha else [])
    assert_user_error(call(capsys, *args), fragment)
    assert not out_file.exists()
    assert not list(out_file.parent.glob(".*"))  # no temp file of the write either


def test_offline(tmp_path, capsys):
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert_user_error(
        call(capsys, "download", "--url", f"http://127.0.0.1:{port}/x", "--out", str(tmp_path / "x")), "cannot reach"
    )


@pytest.mark.parametrize(
    "args,fragment",
    [
        ([], "give a corpus NAME or --url"),
        (["nosuch"], "unknown corpus 'nosuch'; known corpora: tinyshakespeare, tang_poems"),
        (["tang_poems", "--out", "f"], "--out and --sha256 go with --url"),
        (["tang_poems", "--mirror", "ftp-ish:nonsense"], "not a URL charlm can fetch"),
        (
            ["--url", "http://127.0.0.1:1/x", "--out", "f", "--mirror", "http://127.0.0.1:1/"],
            "--mirror goes with a corpus",
        ),
        (["--url", "http://127.0.0.1:1/x"], "--url needs --out"),
        (["--url", "http://127.0.0.1:1/x", "--out", "f", "--sha256", "xyz"], "--sha256 must be 64 hexadecimal"),
        (["--url", "ftp-ish:nonsense", "--out", "f"], "not a URL charlm can fetch"),
    ],
)
def test_usage_errors(tmp_path, capsys, args, fragment, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(call(capsys, "download", *args), fragment)
