"""Every door that takes an image (issue 28: Generate, Compare, the Inside tab's image request), driven through the
hosted app's named endpoints as any visitor can call them without the page (gradio_client), on tiny:llava: a corrupt
upload, an oversized one and a server path given as the image each get a clear answer naming the image, no answer
carries the bytes of a file outside the upload, and the engine goes on serving (a good image afterwards works)."""

from __future__ import annotations

import pytest
from PIL import Image

from backend.hosting import HostPolicy
from tests.ui.conftest import free_port

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")

SECRET = "SECRET-IMAGE-7"
IMAGE_DOORS = {"/generate": 2, "/compare": 0, "/image_prefill": 0}  # endpoint -> index of its status output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-door")
    good = root / "good.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(good)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + SECRET.encode() * 8)
    big = root / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (9 * 2**20))  # over the app's 8 MB
    outside = root / "outside.png"  # an image's name: Gradio's file-type check lets it by, its path check must not
    outside.write_text(SECRET)
    return dict(good=str(good), corrupt=str(corrupt), big=str(big), outside=str(outside))


@pytest.fixture(scope="module")
def client():
    import app as app_module
    from backend.loading.builtin import resolve_builtin
    from ui.callbacks import Lab

    resolve_builtin("tiny:llava")
    lab = Lab(update_s=0.2, policy=HostPolicy.hosted_defaults(), host_model="tiny:llava")
    demo = app_module.make_demo("tiny:llava", lab=lab)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()
    lab.session.close()


def _status(client, api_name: str, image) -> str:
    """The endpoint's status line for a request with `image` (or the error it answers), as text."""
    kwargs = dict(image=image)
    if api_name == "/generate":
        kwargs.update(prompt="Describe.", mode="copies", copies=1)  # the host's parallel cap: 4
    if api_name == "/compare":
        kwargs.update(choice="tiny:llava", a_impl="auto", b_impl="transformers", max_new=4)
    try:
        out = client.predict(**kwargs, api_name=api_name)
    except AppError as e:
        return f"error: {e}"
    return str(out[IMAGE_DOORS[api_name]])


def test_image_inputs_are_named_in_the_api(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for api_name in IMAGE_DOORS:
        names = [p["parameter_name"] for p in endpoints[api_name]["parameters"]]
        assert "image" in names, (api_name, names)


@pytest.mark.parametrize("api_name", sorted(IMAGE_DOORS))
def test_every_image_door_answers_bad_images_clearly(client, files, api_name):
    answer = _status(client, api_name, handle_file(files["corrupt"]))
    assert "image: cannot decode the image (corrupt.png)" in answer, answer
    assert SECRET not in answer and files["corrupt"] not in answer
    answer = _status(client, api_name, handle_file(files["big"]))
    assert "image: the file is 9.0 MB; at most 8 MB here" in answer, answer
    answer = _status(client, api_name, handle_file(files["good"]))  # the engine still serves
    assert "cannot decode" not in answer and "error" not in answer.lower(), answer


def test_a_server_path_as_the_image_is_not_read(client, files):
    """A visitor who names a file on the server as the image (raw HTTP: gradio_client would upload a local file)
    gets Gradio's refusal (preprocess reads only files in its upload folder); nothing of the file comes back."""
    import httpx

    base = client.src.rstrip("/")
    image = {"path": files["outside"], "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(f"{base}/gradio_api/call/image_prefill", json={"data": ["Describe.", image, True]}).json()
    stream = httpx.get(f"{base}/gradio_api/call/image_prefill/{event['event_id']}", timeout=60).text
    assert "event: error" in stream and SECRET not in stream, stream
    assert "cannot decode" not in stream  # refused before our decoding: the file was never opened
