"""Issue 28, the app: an image request driven in a real headless chromium (as tests/ui/test_browser_layout.py) on
tiny:llava, the app's random-weight image-text model: the upload (1024x640) or the bundled sample (1280x900) in the
Generate tab, the run's output, the Inside tab's image request (image placeholders marked in the token view, the KV
blocks holding image features coloured in the KV map, the vision tower's share of the step time), and the layout at
both sizes. With FLAB_UPDATE_SCREENSHOTS=1 the 1280x900 Inside view is saved as docs/screenshot_image.png."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.ui.conftest import free_port
from tests.ui.test_browser import DOCS
from tests.ui.test_browser_layout import SIZES, browser, check_layout  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")
VLM = "tiny:llava"


@pytest.fixture(scope="module")
def vlm_app_url():
    """The app with tiny:llava as the host's model (loaded at page load), on a free loopback port."""
    import app as app_module
    from backend.loading.builtin import resolve_builtin
    from ui.callbacks import Lab
    from ui.layout import CSS, THEME, build_demo

    resolve_builtin(VLM)
    lab = Lab(update_s=0.2, host_model=VLM)
    demo = build_demo(lab, default_model=VLM).queue(default_concurrency_limit=app_module.QUEUE_CONCURRENCY)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    lab.session.close()


@pytest.fixture(scope="module")
def red_png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("upload") / "red.png"
    Image.new("RGB", (48, 48), (210, 30, 30)).save(path)
    return str(path)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_an_image_request_in_the_browser(browser, vlm_app_url, red_png, size):  # noqa: F811
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.set_default_timeout(120_000)
    try:
        page.goto(vlm_app_url)
        expect(page.get_by_text("blocks × 16 tokens", exact=False).first).to_be_visible()
        note = page.locator("#flab-image-note")
        expect(note).to_contain_text("takes images")  # the accordion opened for an image-text model
        if size == SIZES[0]:  # an upload
            page.locator("#flab-image input[type=file]").set_input_files(red_png)
            expect(page.locator("#flab-image")).to_contain_text("red")
        else:  # the bundled sample
            page.locator("#flab-image-box").get_by_role("button", name="Use the sample image").click()
            expect(page.locator("#flab-image")).to_contain_text("sample_image")
        page.locator("#flab-generate").click()
        expect(page.get_by_text("done:", exact=False).first).to_be_visible()
        expect(page.locator("#flab-output textarea")).not_to_have_value("")
        check_layout(page, "Generate")
        page.screenshot(path=str(DOCS / f"layout_image_generate_{size[0]}.png"), full_page=True)

        page.get_by_role("tab", name="Inside the engine").click()
        page.locator("#flab-image-inside").get_by_text("An image request, inside", exact=False).click()
        page.locator("#flab-image-prefill").click()
        status = page.locator("#flab-image-status")
        expect(status).to_contain_text("image placeholder(s)")
        expect(status).to_contain_text("Vision tower")
        expect(page.locator("#flab-image-tokens")).to_contain_text("<image> × 16")
        expect(page.locator("#flab-kv")).to_contain_text("holds image features")
        check_layout(page, "Inside")
        page.screenshot(path=str(DOCS / f"layout_image_inside_{size[0]}.png"), full_page=True)
        if size == SIZES[1]:  # the README's picture: the KV map and the image request below it, one window
            page.locator("#flab-kv").evaluate("el => { el.scrollIntoView({block: 'start'}); window.scrollBy(0, -40); }")
            page.wait_for_timeout(300)
            page.screenshot(path=str(DOCS / "screenshot_image.png"))
    finally:
        page.close()
