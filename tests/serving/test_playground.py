"""The playground page of `charlm serve`, driven in headless Chromium (Playwright) against a live server."""

from __future__ import annotations

import shutil

import pytest
from live_server import LiveServer, run_dir  # noqa: F401 - run_dir is a fixture used here

pytest.importorskip("httpx")
playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-quic",
]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(run_dir):
    live = LiveServer(run_dir, "--max-tokens", "5000")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        tab = browser.new_page(viewport={"width": 1200, "height": 800})
        fetched = []
        tab.on("request", lambda r: fetched.append(r.url))
        tab.goto(live.url + "/")
        tab.fetched = fetched
        yield tab
        browser.close()
    live.stop()


def generated(tab) -> str:
    return tab.evaluate("() => pieces.map((x) => x[0]).join('')")


@pytest.mark.slow
def test_generate_streams_text_onto_the_page(page):
    page.fill("#prompt", "it was the")
    page.fill("#seed", "3")
    page.eval_on_selector("#length", "(el) => { el.value = 200; el.dispatchEvent(new Event('input')); }")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('done')", timeout=30000)
    text = generated(page)
    assert len(text) == 200
    assert page.inner_text("#output").startswith("it was the")
    assert "done (length): 200 characters" in page.inner_text("#status")
    # only the page itself and the API were fetched: no network beyond the server
    origin = page.url.rstrip("/")
    assert all(url.startswith(origin) for url in page.fetched)
    # colour by probability: one span per generated character, coloured
    page.check("#colour")
    spans = page.eval_on_selector_all("#output span[title]", "(els) => els.map((e) => e.style.backgroundColor)")
    assert len(spans) == 200 and len(set(spans)) > 5


@pytest.mark.slow
def test_text_arrives_while_it_is_generated_and_stop_ends_it(page):
    page.uncheck("#colour")
    page.fill("#seed", "")
    page.eval_on_selector("#length", "(el) => { el.value = 5000; el.dispatchEvent(new Event('input')); }")
    page.click("#generate")
    page.wait_for_function("() => pieces.length > 20", timeout=30000)
    seen = generated(page)
    assert page.is_disabled("#generate") and not page.is_disabled("#stop")  # still generating
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('stopped')", timeout=10000)
    stopped_at = len(generated(page))
    assert 20 < stopped_at < 5000 and generated(page).startswith(seen)
    page.wait_for_timeout(500)
    assert len(generated(page)) == stopped_at  # nothing arrives after Stop


@pytest.mark.slow
def test_a_bad_setting_shows_the_servers_message(page):
    page.fill("#prompt", "Zzz")  # 'Z' never occurs in the training text
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0", timeout=10000)
    assert "never saw in training: 'Z'" in page.inner_text("#error")
    assert page.inner_text("#status") == "error"
