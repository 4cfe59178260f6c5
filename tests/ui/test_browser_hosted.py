"""A hosted app (the hosted defaults, as on a Space) in a real headless browser: the remote-code toggle is shown
disabled with the host's reason, and a local path outside the allowed folders is refused with the one message."""

from __future__ import annotations

import pytest

from backend.hosting import HostPolicy
from backend.hosting.paths import PATH_REFUSED
from backend.hosting.remote_code import remote_code_status
from tests.ui.conftest import LOAD_ARGS, free_port
from tests.ui.test_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")


@pytest.fixture(scope="module")
def hosted(ui_cache, tmp_path_factory):
    import app as app_module
    from ui.callbacks import Lab
    from ui.layout import CSS, THEME

    allowed = tmp_path_factory.mktemp("allowed")
    policy = HostPolicy.hosted_defaults(allowed_dirs=(allowed,))
    lab = Lab(update_s=0.2, policy=policy, host_model=LOAD_ARGS["choice"])
    demo = app_module.make_demo(LOAD_ARGS["choice"], lab)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS)
    yield dict(url=f"http://127.0.0.1:{port}/", policy=policy, lab=lab)
    demo.close()
    lab.session.close()


@pytest.fixture(scope="module")
def page(hosted):
    import os
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        sync_api.expect.set_options(timeout=60_000)
        page.goto(hosted["url"])
        yield page
        browser.close()


def test_hosted_app_in_the_browser(page, hosted, ui_cache):
    from playwright.sync_api import expect

    expect(page.get_by_text("blocks × 16 tokens", exact=False).first).to_be_visible()  # the host's model loaded
    toggle = page.locator("#flab-remote-code input[type=checkbox]")
    expect(toggle).to_be_disabled()
    expect(toggle).not_to_be_checked()
    expect(page.locator("#flab-remote-code")).to_contain_text(remote_code_status(hosted["policy"]))
    expect(page.locator("#flab-host-policy")).to_contain_text("hosted: yes")
    model = page.locator("#flab-model input")
    model.fill(str(ui_cache))  # an existing checkpoint folder, outside the allowed folder
    model.press("Enter")
    page.get_by_role("button", name="Load", exact=True).click()
    status = page.locator("#flab-load-status")
    expect(status).to_contain_text(PATH_REFUSED)
    expect(status).to_contain_text("still loaded, unchanged")
    assert hosted["lab"].session.spec.model == LOAD_ARGS["choice"]
    page.get_by_role("tab", name="Benchmark").click()  # the Benchmark tab is the host's: the reason, no button
    expect(page.locator("#flab-bench-off")).to_contain_text("the Benchmark tab is for the host only on this host")
    expect(page.locator("#flab-bench")).to_be_disabled()
