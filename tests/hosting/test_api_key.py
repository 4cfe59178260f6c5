"""The API key (constant-time Bearer check) and the body size limit, on a tiny FastAPI app through starlette's
TestClient (httpx): the exact bodies a client sees."""

from __future__ import annotations

import json

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.testclient import TestClient

from backend.hosting import ApiKeyMiddleware, BodySizeLimitMiddleware, HostPolicy, require_api_key
from backend.hosting.api_key import MISSING_KEY, OPENAI_PREFIXES, WRONG_KEY, key_problem

KEY = "s3cret-key"


def unauthorized(message: str) -> dict:
    return {"error": {"message": message, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}


def tiny_app(policy: HostPolicy, prefixes: tuple[str, ...] | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> dict:
        return {"m": 1}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        return {"echo": len(json.dumps(body))}

    @app.get("/ui")
    async def ui() -> dict:
        return {"page": "gradio"}

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=policy.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, policy=policy, prefixes=prefixes)
    return app


@pytest.fixture
def client():
    with TestClient(tiny_app(HostPolicy.hosted_defaults(api_key=KEY))) as c:
        yield c


def test_missing_and_wrong_key(client):
    for headers, message in (
        ({}, MISSING_KEY),
        ({"Authorization": "Basic abc"}, MISSING_KEY),
        ({"Authorization": "Bearer "}, MISSING_KEY),
        ({"Authorization": "Bearer wrong"}, WRONG_KEY),
        ({"Authorization": f"Bearer {KEY}x"}, WRONG_KEY),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, WRONG_KEY),
    ):
        r = client.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401, headers
        assert r.json() == unauthorized(message)
        assert r.headers["www-authenticate"] == "Bearer"
    assert MISSING_KEY == "missing API key: send 'Authorization: Bearer <key>'"
    assert WRONG_KEY == "incorrect API key provided"


def test_right_key(client):
    r = client.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"echo": len('{"prompt": "hi"}')}
    assert client.post("/v1/completions", json={}, headers={"authorization": f"bearer  {KEY} "}).status_code == 200


def test_health_and_metrics_need_the_key_unless_public():
    with TestClient(tiny_app(HostPolicy.hosted_defaults(api_key=KEY))) as c:
        assert c.get("/health").status_code == 401 and c.get("/metrics").status_code == 401
    policy = HostPolicy.hosted_defaults(api_key=KEY, health_public=True)
    with TestClient(tiny_app(policy)) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/metrics").status_code == 401
        assert c.get("/health/../metrics").status_code == 401  # no way around through the path
    policy = HostPolicy.hosted_defaults(api_key=KEY, health_public=True, metrics_public=True)
    with TestClient(tiny_app(policy)) as c:
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.post("/v1/completions", json={}).status_code == 401


def test_prefixes_leave_the_ui_open():
    with TestClient(tiny_app(HostPolicy.hosted_defaults(api_key=KEY), prefixes=OPENAI_PREFIXES)) as c:
        assert c.get("/ui").json() == {"page": "gradio"}
        assert c.post("/v1/completions", json={}).status_code == 401
        assert c.get("/v1").status_code == 401
    with TestClient(tiny_app(HostPolicy.hosted_defaults(api_key=KEY))) as c:
        assert c.get("/ui").status_code == 401  # no prefixes: every path


def test_no_key_no_check():
    with TestClient(tiny_app(HostPolicy())) as c:
        assert c.post("/v1/completions", json={}).status_code == 200


def test_dependency():
    policy = HostPolicy.hosted_defaults(api_key=KEY)
    app = FastAPI()

    @app.exception_handler(HTTPException)
    async def openai_body(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(unauthorized(exc.detail), status_code=exc.status_code, headers=exc.headers)

    @app.get("/v1/models", dependencies=[Depends(require_api_key(policy))])
    async def models() -> dict:
        return {"data": []}

    with TestClient(app) as c:
        assert c.get("/v1/models").json() == unauthorized(MISSING_KEY)
        assert c.get("/v1/models", headers={"Authorization": "Bearer no"}).json() == unauthorized(WRONG_KEY)
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json() == {"data": []}


def test_key_problem_compares_whole_keys():
    assert key_problem(f"Bearer {KEY}", KEY) is None
    assert key_problem("Bearer " + KEY.upper(), KEY) == WRONG_KEY
    assert key_problem(None, KEY) == MISSING_KEY


TOO_LARGE = {
    "error": {
        "message": "the request body is over this server's limit of 1024 bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
}


def test_body_size_limit_from_content_length():
    with TestClient(tiny_app(HostPolicy(max_body_bytes=1024))) as c:
        ok = c.post("/v1/completions", json={"prompt": "x" * 900})
        assert ok.status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x" * 2000})
        assert r.status_code == 413 and r.json() == TOO_LARGE


def test_body_size_limit_on_a_chunked_body():
    """No Content-Length: the limit is counted as the body streams in, and the app's answer is replaced."""
    chunks = [b'{"prompt": "'] + [b"x" * 256] * 8 + [b'"}']
    with TestClient(tiny_app(HostPolicy(max_body_bytes=1024))) as c:
        r = c.post("/v1/completions", content=iter(chunks), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json() == TOO_LARGE
        small = [b'{"prompt": "', b"x" * 100, b'"}']
        r = c.post("/v1/completions", content=iter(small), headers={"Content-Type": "application/json"})
        assert r.status_code == 200


def test_key_is_checked_before_the_body_is_read():
    policy = HostPolicy.hosted_defaults(api_key=KEY, max_body_bytes=1024)
    with TestClient(tiny_app(policy)) as c:
        assert c.post("/v1/completions", json={"prompt": "x" * 5000}).status_code == 401
        r = c.post("/v1/completions", json={"prompt": "x" * 5000}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 413
