"""/v1/chat/completions with image parts (backend/server/images.py, backend/multimodal/chat.py): data: URLs under the
host's limits, remote URLs only from allowed domains and never from private addresses (DNS mocked: no network),
clear 400s naming the field, the value and what is allowed, and the engine serving on after each. Prefix caching
through the server: the same placeholder ids with different images share no blocks, the same image and prompt do."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient

from backend import Engine, SamplingParams
from backend.hosting import HostPolicy
from backend.server import build_app
from backend.server import images as server_images
from backend.tools.tiny_vlms import build_tiny_vlm
from tests.models.vlm_reference import random_images
from tests.server.conftest import TEMPLATE

FIELD = "messages[0].content[1].image_url"


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    return build_tiny_vlm("llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def engine(vlm_path):
    with Engine(str(vlm_path), dtype="float32", device="cpu", kv_cache_memory_gb=0.05, block_size=4) as engine:
        yield engine


def client(engine: Engine, **policy) -> TestClient:
    return TestClient(build_app(engine, policy=HostPolicy(**policy)))


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat(*urls: str, text: str = "Describe:", max_tokens: int = 6) -> dict:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens, "temperature": 0}


def error_of(response, param: str | None = None) -> dict:
    assert response.status_code == 400, response.text
    err = response.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_serves(c: TestClient) -> None:
    """A following normal request succeeds (text, then an image)."""
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    r = c.post("/v1/chat/completions", json=chat(data_url(png(random_images(1, seed=9)[0]))))
    assert r.status_code == 200, r.text


def test_data_url_image_equals_the_python_api(engine):
    image = random_images(1, seed=1)[0]
    body = chat(data_url(png(image)))
    r = client(engine).post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe:"}, {"type": "image", "image": image}]}]
    out = engine.chat(messages, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert text == out.text
    assert r.json()["usage"]["prompt_tokens"] == len(out.prompt_token_ids)  # the placeholders expanded
    tokenized = client(engine).post("/tokenize", json={"messages": body["messages"]}).json()
    assert tokenized["tokens"] == out.prompt_token_ids


def test_streamed_image_request_and_n_choices(engine):
    body = chat(data_url(png(random_images(1, seed=2)[0]))) | {"stream": True, "n": 2}
    with client(engine).stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert sum('"finish_reason":"length"' in line.replace(" ", "") for line in lines) == 2


@pytest.mark.parametrize(
    "url, words",
    [
        (data_url(b"\x89PNG\r\n\x1a\n not an image at all"), ["cannot decode"]),
        ("data:image/png;base64,@@@not base64@@@", ["base64"]),
        ("data:text/plain;base64,aGVsbG8=", ["image/*", "text/plain"]),
        ("data:image/png,rawtext", ["base64"]),
    ],
)
def test_corrupted_images_are_400s_naming_the_field(engine, url, words):
    c = client(engine)
    err = error_of(c.post("/v1/chat/completions", json=chat(url)), FIELD)
    assert all(w in err["message"] for w in words), err
    assert_serves(c)


def test_truncated_png_is_refused(engine):
    data = png(random_images(1, seed=3)[0])
    err = error_of(client(engine).post("/v1/chat/completions", json=chat(data_url(data[: len(data) // 2]))), FIELD)
    assert "cannot decode" in err["message"]


def test_host_limits_on_count_pixels_and_bytes(engine):
    image = random_images(1, seed=4, size=(40, 48))[0]  # 48 x 40 = 1920 pixels
    url = data_url(png(image))
    c = client(engine, max_images_per_request=1)
    err = error_of(c.post("/v1/chat/completions", json=chat(url, url)), "messages[0].content[2].image_url")
    assert err["code"] == "too_many_images" and "2 images" in err["message"] and "at most 1" in err["message"]
    assert_serves(c)
    c = client(engine, max_image_pixels=1000)
    err = error_of(c.post("/v1/chat/completions", json=chat(url)), FIELD)
    assert "48x40 = 1920 pixels" in err["message"] and "at most 1000" in err["message"]
    size = len(png(image))
    c = client(engine, max_image_bytes=size - 10)
    err = error_of(c.post("/v1/chat/completions", json=chat(url)), FIELD)
    assert f"at most {size - 10}" in err["message"]
    assert client(engine, max_image_bytes=size).post("/v1/chat/completions", json=chat(url)).status_code == 200


def test_decompression_bomb_is_refused_from_its_header(engine):
    """An 8000 x 8000 PNG of a few KB: refused by its header's size, never decoded."""
    from PIL import Image

    bomb = png(Image.new("1", (8000, 8000)))
    assert len(bomb) < 100_000
    err = error_of(client(engine, max_image_pixels=10**6).post("/v1/chat/completions", json=chat(data_url(bomb))))
    assert "8000x8000" in err["message"]


def test_image_tokens_over_the_context_are_a_context_error(vlm_path):
    with Engine(str(vlm_path), dtype="float32", device="cpu", num_kv_blocks=8, block_size=4, max_model_len=12) as e:
        url = data_url(png(random_images(1)[0]))
        err = error_of(client(e).post("/v1/chat/completions", json=chat(url, url)), "messages")
        assert err["code"] == "context_length_exceeded" and "12" in err["message"]
        r = client(e).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 200, r.text


def test_remote_url_refused_unless_the_domain_is_allowed(engine, monkeypatch):
    def no_network(*args):
        raise AssertionError("no fetch expected")

    monkeypatch.setattr(server_images, "resolve_host", no_network)
    monkeypatch.setattr(server_images, "http_get", no_network)
    c = client(engine)
    err = error_of(c.post("/v1/chat/completions", json=chat("https://images.example.com/cat.png")), FIELD)
    assert "not fetched" in err["message"] and "--allowed-image-domains" in err["message"]
    c = client(engine, allowed_image_domains=("images.example.com",))
    err = error_of(c.post("/v1/chat/completions", json=chat("https://evil.example.net/cat.png")), FIELD)
    assert "only from images.example.com" in err["message"] and "evil.example.net" in err["message"]
    assert_serves(c)


@pytest.mark.parametrize(
    "address", ["10.0.0.5", "127.0.0.1", "169.254.169.254", "192.168.1.2", "::1", "::ffff:127.0.0.1", "fd00::1"]
)
def test_allowed_domain_resolving_to_a_private_address_is_refused(engine, monkeypatch, address):
    monkeypatch.setattr(server_images, "resolve_host", lambda host, port: ["93.184.216.34", address])

    def no_connect(*args):
        raise AssertionError("no connection to a private address")

    monkeypatch.setattr(server_images, "http_get", no_connect)
    c = client(engine, allowed_image_domains=("images.example.com",))
    err = error_of(c.post("/v1/chat/completions", json=chat("http://images.example.com/a.png")), FIELD)
    assert address in err["message"] and "public addresses only" in err["message"]
    assert_serves(c)


class FakeResponse:
    def __init__(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.status = status
        self.body = io.BytesIO(body)
        self.headers = headers or {}

    def getheader(self, name: str, default=None):
        return self.headers.get(name, default)

    def read(self, n: int) -> bytes:
        return self.body.read(n)


class FakeConnection:
    def close(self) -> None:
        pass


def fake_web(monkeypatch, pages: dict[str, FakeResponse]) -> list:
    """Serve `pages` ("host/path" -> response) at a public address; returns the requests made."""
    seen: list = []
    monkeypatch.setattr(server_images, "resolve_host", lambda host, port: ["93.184.216.34"])

    def get(scheme, host, address, port, target, timeout):
        seen.append((scheme, host, address, port, target))
        assert address == "93.184.216.34" and 0 < timeout <= server_images.FETCH_TIMEOUT_S
        return FakeConnection(), pages[host + target]

    monkeypatch.setattr(server_images, "http_get", get)
    return seen


def test_allowed_domain_is_fetched_at_the_checked_address(engine, monkeypatch):
    image = random_images(1, seed=5)[0]
    seen = fake_web(monkeypatch, {"images.example.com/cat.png": FakeResponse(200, png(image))})
    c = client(engine, allowed_image_domains=("images.example.com",))
    r = c.post("/v1/chat/completions", json=chat("https://images.example.com/cat.png"))
    assert r.status_code == 200, r.text
    assert seen == [("https", "images.example.com", "93.184.216.34", 443, "/cat.png")]
    local = client(engine).post("/v1/chat/completions", json=chat(data_url(png(image))))
    assert r.json()["choices"][0]["message"]["content"] == local.json()["choices"][0]["message"]["content"]


def test_fetch_follows_same_host_redirects_only_and_caps_bytes(engine, monkeypatch):
    image = png(random_images(1, seed=6)[0])
    pages = {
        "images.example.com/a": FakeResponse(302, headers={"Location": "/b.png"}),
        "images.example.com/b.png": FakeResponse(200, image),
        "images.example.com/away": FakeResponse(301, headers={"Location": "http://10.0.0.1/x.png"}),
        "images.example.com/big": FakeResponse(200, image, {"Content-Length": str(len(image))}),
        "images.example.com/big-unsized": FakeResponse(200, image),
        "images.example.com/missing": FakeResponse(404),
    }
    fake_web(monkeypatch, pages)
    c = client(engine, allowed_image_domains=("images.example.com",), max_image_bytes=len(image))
    assert c.post("/v1/chat/completions", json=chat("http://images.example.com/a")).status_code == 200
    err = error_of(c.post("/v1/chat/completions", json=chat("http://images.example.com/away")), FIELD)
    assert "another host" in err["message"]
    err = error_of(c.post("/v1/chat/completions", json=chat("http://images.example.com/missing")), FIELD)
    assert "HTTP 404" in err["message"]
    small = client(engine, allowed_image_domains=("images.example.com",), max_image_bytes=len(image) - 1)
    for path in ("big", "big-unsized"):
        err = error_of(small.post("/v1/chat/completions", json=chat(f"http://images.example.com/{path}")), FIELD)
        assert f"at most {len(image) - 1}" in err["message"]
    assert_serves(c)


def test_image_for_a_text_model_is_refused(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=64) as engine:
        c = TestClient(build_app(engine, chat_template=TEMPLATE))
        url = data_url(png(random_images(1)[0]))
        err = error_of(c.post("/v1/chat/completions", json=chat(url)), FIELD)
        assert err["code"] == "unsupported_content" and "takes no images" in err["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_prefix_cache_keys_on_the_pixels(engine):
    """Same placeholder ids, different images: different outputs, no cached block; same image and prompt: hits."""
    c = client(engine)
    a, b = (data_url(png(im)) for im in random_images(2, seed=7))
    text = "Tell me a long story about this picture, please:"
    engine.reset_prefix_cache()
    first = c.post("/v1/chat/completions", json=chat(a, text=text, max_tokens=8)).json()
    hits = engine.stats().prefix_hit_blocks
    other = c.post("/v1/chat/completions", json=chat(b, text=text, max_tokens=8)).json()
    assert other["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert engine.stats().prefix_hit_blocks == hits
    assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]
    again = c.post("/v1/chat/completions", json=chat(a, text=text, max_tokens=8)).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 4
    assert engine.stats().prefix_hit_blocks > hits
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    metrics = c.get("/metrics").text
    assert "prefix" in metrics


def test_real_http_fetch_connects_to_the_checked_address_with_the_host_header(engine, monkeypatch):
    """The real connection code on a loopback server: the address check is lifted for this test only (it refuses
    loopback, as tested above), DNS is mocked; the request reaches the checked address with the URL's Host."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = png(random_images(1, seed=8)[0])
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hosts.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setattr(server_images, "resolve_host", lambda host, p: ["127.0.0.1"])
        monkeypatch.setattr(server_images, "blocked_reason", lambda address: None)
        c = client(engine, allowed_image_domains=("images.example.com",))
        r = c.post("/v1/chat/completions", json=chat(f"http://images.example.com:{port}/cat.png"))
        assert r.status_code == 200, r.text
        assert hosts == [f"images.example.com:{port}"]
    finally:
        server.shutdown()
        server.server_close()
