"""The middlewares on the real OpenAI server app (backend/server build_app over a tiny engine): the lines the
server needs compose with its routes, error handlers and streaming."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from backend import Engine
from backend.hosting import ApiKeyMiddleware, BodySizeLimitMiddleware, HostPolicy
from backend.server import build_app

KEY = "k-123"


@pytest.fixture(scope="module")
def client(tiny_model):
    policy = HostPolicy.hosted_defaults(api_key=KEY, health_public=True, max_body_bytes=4096)
    engine = Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=64, **policy.engine_options())
    app = build_app(engine, "tiny")  # the key is the middleware's job here
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=policy.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, policy=policy)
    with TestClient(app) as c:
        yield c
    engine.close()


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_key_body_limit_and_public_health(client):
    assert client.get("/health").status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "a"}).status_code == 401
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "a" * 5000}, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_streaming_passes_through(client):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= 2
