"""A real headless browser (Playwright + Debian's chromium) drives the app; saves screenshot_*.png
(into docs/ with FLAB_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FLAB_CHROMIUM", "/usr/bin/chromium")
# Screenshots go to docs/ only when asked (FLAB_UPDATE_SCREENSHOTS=1), so a test run leaves the tree clean.
DOCS = (
    Path(__file__).resolve().parents[2] / "docs"
    if os.environ.get("FLAB_UPDATE_SCREENSHOTS") == "1"
    else Path(os.environ.get("TMPDIR", "/tmp")) / "flab-screenshots"
)
DOCS.mkdir(parents=True, exist_ok=True)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")


@pytest.fixture(scope="module")
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        sync_api.expect.set_options(timeout=60_000)  # 2 shared CPU cores: be patient
        page.goto(app_url)
        yield page
        browser.close()


def test_generate_in_the_browser(page):
    from playwright.sync_api import expect

    expect(page.get_by_text("random weights — for trying the app offline", exact=False).first).to_be_visible()
    expect(page.get_by_text("blocks × 16 tokens", exact=False).first).to_be_visible()  # page load loaded a model
    page.get_by_role("button", name="Load", exact=True).click()  # the panel's settings (auto implementation)
    expect(page.get_by_text("auto resolved to", exact=False).first).to_be_visible()
    page.locator("#flab-copies input[type=number]").fill("8")  # 8 parallel requests share the batch
    page.locator("#flab-copies input[type=number]").press("Enter")
    page.get_by_text("Sampling").click()
    max_new = page.locator("#flab-max-new input[type=number]")
    expect(max_new).to_be_visible()
    page.wait_for_timeout(500)  # let the accordion finish rendering before typing
    max_new.fill("160")
    max_new.press("Enter")
    expect(max_new).to_have_value("160")
    page.locator("#flab-generate").click()
    output = page.locator("#flab-output textarea")
    expect(output).not_to_have_value("", timeout=30_000)  # text appears
    expect(page.get_by_text("done:", exact=False).first).to_be_visible(timeout=60_000)
    # plots rendered by plotly.js: the throughput plot has drawn line traces
    expect(page.locator("#flab-throughput .js-plotly-plot .scatterlayer .trace").first).to_be_attached()
    assert page.locator(".js-plotly-plot").count() >= 4  # throughput, TTFT, batch, memory
    assert page.locator("#flab-throughput .scatterlayer .trace path.js-line").count() >= 2
    page.wait_for_timeout(500)
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "screenshot_main.png"), full_page=True)


def test_compare_in_the_browser(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    page.locator("#flab-compare").click()
    expect(page.get_by_text("greedy outputs agree token for token", exact=False).first).to_be_visible(timeout=90_000)
    expect(page.get_by_text("identical (32 tokens)", exact=False).first).to_be_attached()
    page.wait_for_timeout(500)
    page.screenshot(path=str(DOCS / "screenshot_compare.png"), full_page=True)


def test_presets_caps_and_trace_in_the_browser(page):
    """Issue 17: the load status is on screen at 1000 px (bug 6), a max-new of 0 is refused where the user looks
    (bug 4), the KV-budget preset preempts and counts it, and one step's attention calls are traced."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Generate").click()
    status = page.locator("#flab-load-status")
    box = status.bounding_box()
    assert box is not None and box["y"] + 20 < 1000  # visible without scrolling
    max_new = page.locator("#flab-max-new input[type=number]")
    if not max_new.is_visible():
        page.get_by_text("Sampling").click()
    max_new.fill("0")
    page.locator("#flab-generate").click()
    expect(page.get_by_text("max new tokens: 0 is outside the allowed range", exact=False).first).to_be_visible()
    page.locator("#flab-preset-preempt").click()
    expect(page.get_by_text("Preset: KV budget below need", exact=False).first).to_be_visible()
    expect(page.get_by_text("done:", exact=False).first).to_be_visible(timeout=120_000)
    text = page.locator(".flab-status", has_text="preemptions").first.inner_text()
    assert "preemptions: 0" not in text, text
    page.wait_for_timeout(500)
    page.screenshot(path=str(DOCS / "screenshot_preset.png"), full_page=True)
    page.get_by_role("tab", name="Inside the engine").click()
    page.locator("#flab-trace").click()
    expect(page.locator("#flab-trace-status")).to_contain_text("1 prefill", timeout=60_000)
    expect(page.locator("#flab-tree .flab-hit").first).to_be_visible()
    page.wait_for_timeout(500)
    page.screenshot(path=str(DOCS / "screenshot_inside.png"), full_page=True)


def test_benchmark_in_the_browser(page):
    """Last in this file: the benchmark closes the lab's engine."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Benchmark").click()
    page.locator("#flab-bench").click()
    status = page.locator("#flab-bench-status")
    expect(status).to_contain_text("done: 8/8 runs", timeout=180_000)
    expect(status).to_contain_text("measured memory bandwidth")
    expect(page.locator("#flab-load-status")).to_contain_text("loaded again after the benchmark")  # bug 2
    bars = page.locator("#flab-bench-plot .js-plotly-plot .barlayer .trace")
    expect(bars.first).to_be_attached()
    assert bars.count() == 4  # one trace per system
    expect(page.get_by_text("hf-generate_batch", exact=True).first).to_be_attached()  # a table row
    link = page.locator('a[href$="/benchmark.json"]').first  # the download: Gradio serves its copy in its cache
    expect(link).to_be_attached()
    download = page.request.get(link.get_attribute("href"))
    assert download.ok and len(download.json()["results"]) == 8
    page.wait_for_timeout(500)
    page.screenshot(path=str(DOCS / "screenshot_benchmark.png"), full_page=True)
    from tests.ui.test_browser_layout import check_layout

    page.set_viewport_size({"width": 1024, "height": 640})  # issue 30: the filled table at a small window
    check_layout(page, "Benchmark")
    page.set_viewport_size({"width": 1440, "height": 1000})
