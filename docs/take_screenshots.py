"""Refresh the README's screenshots from the app on its real default model (SmolLM2-135M-Instruct), by hand:

    python docs/take_screenshots.py            # writes docs/screenshot_{main,preset,compare,inside,benchmark}.png

Starts the app in this process on a free loopback port and drives it with Playwright and Debian's chromium,
the way tests/ui/test_browser.py does (that test checks the mechanics on a tiny random model; this script
only takes pictures of the real one).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
CHROMIUM = os.environ.get("FLAB_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 300_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    import app as app_module
    from ui.callbacks import Lab
    from ui.layout import CSS, THEME, build_demo

    lab = Lab(update_s=0.3)
    demo = build_demo(lab).queue(default_concurrency_limit=app_module.QUEUE_CONCURRENCY)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})  # a laptop's window
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.get_by_text("blocks × 16 tokens", exact=False).first).to_be_visible(timeout=TIMEOUT_MS)

            page.locator("#flab-generate").click()  # the default run: six different prompts in one batch
            expect(page.get_by_text("done:", exact=False).first).to_be_visible(timeout=TIMEOUT_MS)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(DOCS / "screenshot_main.png"), full_page=True)

            page.locator("#flab-preset-prefix").click()
            expect(page.get_by_text("settings are back", exact=False).first).to_be_visible(timeout=TIMEOUT_MS)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(DOCS / "screenshot_preset.png"), full_page=True)

            page.get_by_role("tab", name="Inside the engine").click()
            page.locator("#flab-trace").click()
            expect(page.locator("#flab-trace-status")).to_contain_text("1 prefill", timeout=TIMEOUT_MS)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(DOCS / "screenshot_inside.png"), full_page=True)

            page.get_by_role("tab", name="Compare").click()
            page.locator("#flab-compare").click()
            # the verdict (the agreement table's header says "greedy outputs" from the start)
            expect(page.get_by_text("warmed up first", exact=False).first).to_be_visible(timeout=TIMEOUT_MS)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(DOCS / "screenshot_compare.png"), full_page=True)

            page.get_by_role("tab", name="Benchmark").click()
            page.locator("#flab-bench").click()
            expect(page.locator("#flab-bench-status")).to_contain_text("done:", timeout=TIMEOUT_MS * 2)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(DOCS / "screenshot_benchmark.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
        lab.session.close()
    print("wrote", ", ".join(f"docs/screenshot_{n}.png" for n in ("main", "preset", "inside", "compare", "benchmark")))


if __name__ == "__main__":
    main()
