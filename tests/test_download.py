"""charlm download against an HTTP server on 127.0.0.1 that the test starts."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

import charlm.download as download_module
from charlm.download import KnownCorpus
from test_cli import assert_user_error, call

BODY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 400).encode()
GOOD_SHA = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802 - the http.server API
        type(self).requests += 1
        if self.path == "/input.txt":
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
    monkeypatch.setitem(download_module.KNOWN_CORPORA, "tinyshakespeare",
                        KnownCorpus(f"{server}/input.txt", GOOD_SHA, "input.txt", "test"))
    monkeypatch.setattr("charlm.cli.KNOWN_CORPORA", download_module.KNOWN_CORPORA)
    code, out, err = call(capsys, "download", "tinyshakespeare", "--dir", str(tmp_path))
    assert code == 0, err
    path = tmp_path / "tinyshakespeare" / "input.txt"
    assert out.strip() == str(path) and path.read_bytes() == BODY
    before = Handler.requests
    code, out, err = call(capsys, "download", "tinyshakespeare", "--dir", str(tmp_path))
    assert code == 0 and "nothing downloaded" in err and Handler.requests == before


def test_real_tinyshakespeare_entry():
    known = download_module.KNOWN_CORPORA["tinyshakespeare"]
    assert known.url.startswith("https://raw.githubusercontent.com/karpathy/char-rnn/")
    assert known.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_any_url_with_and_without_a_hash(server, tmp_path, capsys):
    out_file = tmp_path / "x.txt"
    code, out, err = call(capsys, "download", "--url", f"{server}/input.txt", "--out", str(out_file))
    assert code == 0 and out_file.read_bytes() == BODY
    assert f"its SHA-256 is {GOOD_SHA}" in err and "warning" in err
    code, out, err = call(capsys, "download", "--url", f"{server}/input.txt", "--sha256", GOOD_SHA.upper(),
                          "--out", str(out_file))
    assert code == 0 and "nothing downloaded" in err


@pytest.mark.parametrize("path,sha,fragment", [
    ("/input.txt", "0" * 64, "SHA-256 mismatch: expected 000"),
    ("/missing", None, "HTTP 404 Not Found"),
    ("/drop", None, "the connection dropped after"),
])
def test_failures_leave_nothing_behind(server, tmp_path, capsys, path, sha, fragment):
    out_file = tmp_path / "sub" / "x.txt"
    args = ["download", "--url", f"{server}{path}", "--out", str(out_file)] + (["--sha256", sha] if sha else [])
    assert_user_error(call(capsys, *args), fragment)
    assert not out_file.exists()
    assert not list(out_file.parent.glob(".*part*"))


def test_offline(tmp_path, capsys):
    import socket
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert_user_error(call(capsys, "download", "--url", f"http://127.0.0.1:{port}/x", "--out", str(tmp_path / "x")),
                      "cannot reach")


@pytest.mark.parametrize("args,fragment", [
    ([], "give a corpus NAME or --url"),
    (["nosuch"], "unknown corpus 'nosuch'; known corpora: tinyshakespeare"),
    (["--url", "http://127.0.0.1:1/x"], "--url needs --out"),
    (["--url", "http://127.0.0.1:1/x", "--out", "f", "--sha256", "xyz"], "--sha256 must be 64 hexadecimal"),
    (["--url", "ftp-ish:nonsense", "--out", "f"], "not a URL charlm can fetch"),
])
def test_usage_errors(tmp_path, capsys, args, fragment, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(call(capsys, "download", *args), fragment)
