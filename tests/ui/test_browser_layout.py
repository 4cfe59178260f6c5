"""Issue 30: the app's layout at a small laptop window (1024x640) and a common one (1280x900), in a real headless
chromium (as tests/ui/test_browser.py): no header word split across lines, nothing wider than the window that does
not scroll as a whole, plot titles inside their plots, legends without an inner scrollbar, few memory-axis ticks;
the Inside tab's property table collapsed, the KV map showing the last run with the live view off, the Benchmark
intro said once; Compare's alternated rounds and kernel paths; a preset puts the panel's settings back after its run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.ui.test_browser import ARGS, CHROMIUM, DOCS

SIZES = [(1024, 640), (1280, 900)]
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")

# What a reader would see as broken, measured on the visible part of the page (the active tab).
LAYOUT_JS = (Path(__file__).parent / "layout_check.js").read_text()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        sync_api.expect.set_options(timeout=120_000)  # 2 shared CPU cores: be patient
        yield browser
        browser.close()


def _open(browser, app_url: str, size: tuple[int, int]):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.set_default_timeout(120_000)
    page.goto(app_url)
    expect(page.get_by_text("blocks × 16 tokens", exact=False).first).to_be_visible()  # the page load's engine
    return page


def check_layout(page, where: str) -> dict:
    page.wait_for_timeout(700)  # plotly's resize after a tab switch
    found = page.evaluate(LAYOUT_JS)
    assert found["plots"] > 0 or where in ("Inside", "Benchmark"), (where, found)
    assert found["pageWidth"] <= found["window"], (where, found)  # the page never scrolls sideways
    assert found["splitWords"] == [], (where, found["splitWords"])  # "req/ues/t"
    assert found["cutTables"] == [], (where, found["cutTables"])  # wider than its place and not scrollable
    assert found["cutTitles"] == [], (where, found["cutTitles"])
    assert found["legendScrollbars"] == 0, where
    assert found["cutPlots"] == [], (where, found["cutPlots"])
    return found


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_tab_fits_the_window(browser, app_url, size):
    from playwright.sync_api import expect

    page = _open(browser, app_url, size)
    try:
        # the panel's controls come from EngineConfig's declarations: the CPU kernel path is one of them
        expect(page.get_by_text("CPU kernels", exact=True).first).to_be_visible()
        page.locator("#flab-generate").click()  # the default run: several different prompts
        expect(page.get_by_text("done:", exact=False).first).to_be_visible()
        found = check_layout(page, "Generate")
        assert 2 <= found["memoryTicks"] <= 8, found  # the log axis: labelled ticks only, no "5 2" clutter
        page.screenshot(path=str(DOCS / f"layout_generate_{size[0]}.png"), full_page=True)

        page.get_by_role("tab", name="Inside the engine").click()
        kv_title = page.locator("#flab-kv .gtitle")
        expect(kv_title).to_contain_text("last run")  # the run's blocks, with the live view off
        properties = page.locator("#flab-describe")
        expect(properties).to_be_hidden()  # the long property table starts collapsed
        page.get_by_text("Engine and model properties", exact=False).click()
        expect(properties).to_be_visible()
        page.locator("#flab-trace").click()
        expect(page.locator("#flab-trace-status")).to_contain_text("Why one prefill and one decode")
        check_layout(page, "Inside")
        page.screenshot(path=str(DOCS / f"layout_inside_{size[0]}.png"), full_page=True)

        page.get_by_role("tab", name="Benchmark").click()
        intro = page.get_by_text("python -m backend.tools.bench", exact=False)
        expect(intro.first).to_be_visible()
        assert intro.count() == 1  # said once
        check_layout(page, "Benchmark")

        page.get_by_role("tab", name="Compare").click()
        page.locator("#flab-compare").click()
        expect(page.get_by_text("greedy outputs agree token for token", exact=False).first).to_be_visible()
        expect(page.get_by_text("warmed up first", exact=False).first).to_be_visible()
        expect(page.get_by_text("alternated round(s): A, B, A, B", exact=False).first).to_be_visible()
        expect(page.get_by_text("B: CPU kernels", exact=True)).to_be_visible()  # each side's kernel path
        expect(page.locator("#flab-cmp-rounds")).to_be_visible()
        check_layout(page, "Compare")
        page.screenshot(path=str(DOCS / f"layout_compare_{size[0]}.png"), full_page=True)
    finally:
        page.close()


def test_a_preset_puts_the_panel_back(browser, app_url):
    from playwright.sync_api import expect

    page = _open(browser, app_url, SIZES[1])
    try:
        budget = page.get_by_label("Token budget per step")
        expect(budget).to_have_value("2048")
        page.locator("#flab-preset-chunked").click()
        expect(page.get_by_text("token budget per step 2048 → 48", exact=False).first).to_be_visible()
        expect(page.get_by_text("settings are back", exact=False).first).to_be_visible()
        expect(budget).to_have_value("2048")  # later runs are not left with a 48-token budget
        expect(page.locator("#flab-load-status")).not_to_contain_text("Loading")
    finally:
        page.close()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_first_start_says_what_it_waits_for(browser, tmp_path, monkeypatch, size):
    """A fresh cache whose lock another process holds (as a second `python app.py` converting the GGUF): the page's
    main area shows one line saying it waits for that process, visible without scrolling, and the panel says what it
    waits for; when the other process lets go, the model builds and the page shows the loaded engine."""
    import subprocess
    import sys

    from playwright.sync_api import expect

    import app as app_module
    from backend import paths
    from backend.loading.builtin import builtin_path
    from tests.ui.conftest import free_port
    from tests.ui.test_startup_load import HOLD_LOCK
    from ui.callbacks import Lab
    from ui.layout import CSS, THEME, build_demo

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    target = builtin_path("tiny:llama")
    target.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(target.parent / f".{target.name}.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lab = Lab(update_s=0.2, host_model="tiny:llama")
    demo = build_demo(lab, default_model="tiny:llama").queue(default_concurrency_limit=app_module.QUEUE_CONCURRENCY)
    port = free_port()
    page = None
    try:
        assert holder.stdout.readline().strip() == "held"
        demo.launch(
            server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS
        )
        page = browser.new_page(viewport={"width": size[0], "height": size[1]})
        page.goto(f"http://127.0.0.1:{port}/")
        status = page.locator("#flab-load-status")
        expect(status).to_contain_text("waiting for another process to finish converting")
        box = status.bounding_box()
        assert box is not None and box["y"] + box["height"] <= size[1]  # in view as the page opens
        expect(page.get_by_text("Waiting for the host's model (tiny:llama) to load", exact=False)).to_be_visible()
        holder.stdin.close()  # the other process lets go: this one builds the model and loads it
        expect(page.get_by_text("blocks × 16 tokens", exact=False).first).to_be_visible()
    finally:
        if page is not None:
            page.close()
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
        demo.close()
        lab.session.close()
