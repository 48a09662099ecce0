#!/usr/bin/env python3
"""A screenshot of `charlm serve`'s playground: starts the server on 127.0.0.1, generates from the
page in headless Chromium (Playwright) with the probability colours on, and saves a PNG.

    python scripts/playground_screenshot.py --checkpoint runs/shakespeare_lstm --out playground.png
"""

from __future__ import annotations

import argparse
import shutil

from load_serve import start_server, stop_server
from playwright.sync_api import sync_playwright

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="playground.png")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--length", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("needs Chromium (apt-get install chromium)")
    proc, url = start_server(args.checkpoint, [])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(url + "/")
            page.fill("#prompt", args.prompt)
            page.fill("#seed", str(args.seed))
            page.eval_on_selector(
                "#length", f"(el) => {{ el.value = {args.length}; el.dispatchEvent(new Event('input')); }}"
            )
            page.check("#colour")
            page.click("#generate")
            page.wait_for_function(
                "() => document.getElementById('status').textContent.startsWith('done')", timeout=60000
            )
            page.screenshot(path=args.out)
            browser.close()
    finally:
        stop_server(proc)
    print(args.out)


if __name__ == "__main__":
    main()
