"""What a hostile client does at the HTTP level (issue 26, item 10), on loopback: a request that can never fit
the per-visitor cap is a 400 (not a 429 that clients retry forever); two Authorization headers are refused; idle
connections, a request head that never ends and a trickling body are cut off (backend/hosting/timeouts.py)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from backend import Engine
from backend.hosting import HostPolicy
from backend.hosting.timeouts import ConnectionTimeouts, uvicorn_options
from backend.server import build_app
from tests.server.conftest import start_server

KEY = "s3cret"
CAP = 2
SHORT = ConnectionTimeouts(head_s=1.0, keep_alive_s=1.0, body_s=1.0)
CUT_OFF_GUARD_S = 30  # far above the 1 s bounds: only a connection that is never cut off fails the test


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=64, max_num_seqs=8) as e:
        yield e


@pytest.fixture(scope="module")
def hosted(engine):
    """A hosted server (API key, CAP sequences per visitor) with short connection timeouts."""
    policy = HostPolicy.hosted_defaults(api_key=KEY, max_parallel_per_visitor=CAP)
    app = build_app(engine, served_model_name="tiny", policy=policy, timeouts=SHORT)
    server, thread, url = start_server(app, **uvicorn_options(SHORT))
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def test_n_over_the_per_visitor_cap_is_a_400_naming_n(hosted):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "n": CAP + 1}
    r = httpx.post(f"{hosted}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and error["type"] == "invalid_request_error"
    assert f"at most {CAP} per visitor" in error["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": CAP + 1}
    r = httpx.post(f"{hosted}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    ok = dict(body, n=CAP)
    r = httpx.post(f"{hosted}/v1/completions", json=ok, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("order", [("wrong", KEY), (KEY, "wrong"), (KEY, KEY)])
def test_two_authorization_headers_are_refused(hosted, order):
    headers = [("Authorization", f"Bearer {key}") for key in order]
    r = httpx.get(f"{hosted}/v1/models", headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert "one Authorization header" in r.json()["error"]["message"]
    assert httpx.get(f"{hosted}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).status_code == 200


def test_two_authorization_headers_are_refused_by_the_servers_own_key_check(engine):
    server, thread, url = start_server(build_app(engine, served_model_name="tiny", api_key=KEY))
    try:
        headers = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {KEY}")]
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        assert r.status_code == 401 and "one Authorization header" in r.json()["error"]["message"], r.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does within the guard)."""
    sock.settimeout(CUT_OFF_GUARD_S)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {CUT_OFF_GUARD_S} s (received {received[:200]!r})")
    except ConnectionResetError:
        pass
    return received


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_a_connection_that_sends_nothing_is_closed(hosted):
    with _connect(hosted) as sock:
        assert _closed_by_server(sock) == b""


def test_a_request_head_that_never_ends_is_closed(hosted):
    with _connect(hosted) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
        assert _closed_by_server(sock) == b""


def test_an_idle_keep_alive_connection_is_closed(hosted):
    with _connect(hosted) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
        assert _closed_by_server(sock).startswith(b"HTTP/1.1 200")


def test_a_trickling_body_is_cut_off_with_a_408(hosted):
    body = b'{"model": "tiny", "prompt": "' + b"a" * 200 + b'"}'
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with _connect(hosted) as sock:
        sock.sendall(head)
        sock.settimeout(0.3)
        answer = b""
        start = time.monotonic()
        for byte in body:  # one byte every 0.3 s: the whole body would take a minute
            try:
                sock.sendall(bytes([byte]))
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if answer:
                break
            if time.monotonic() - start > CUT_OFF_GUARD_S:
                break
        answer += _closed_by_server(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"code":"request_timeout"' in answer.replace(b" ", b"")
