"""Files as an attacker or an accident makes them (issue 25): crafted model files end in one line and exit 2
before any allocation, export never destroys its source, and nothing exported carries a credential."""

from __future__ import annotations

import pytest

from charlm.config import redact_uri


@pytest.mark.parametrize("uri, expected", [
    ("http://user:pass@mlflow.example:5000/api", "http://mlflow.example:5000/api"),
    ("https://:s3cret@mlflow.example/", "https://mlflow.example/"),
    ("https://p@ss:w@rd@host/x", "https://host/x"),
    ("https://token@host", "https://host"),
    ("user:pw@host:5000", "host:5000"),
    ("http://host/?token=abc&experiment=1", "http://host/?token=REDACTED&experiment=1"),
    ("mlruns", "mlruns"),
    ("file:///tmp/mlruns", "file:///tmp/mlruns"),
    ("/home/a@b/mlruns", "/home/a@b/mlruns"),
])
def test_redact_uri_strips_userinfo_and_secret_query_values(uri, expected):
    assert redact_uri(uri) == expected
