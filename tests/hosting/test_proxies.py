"""API clients behind a proxy: told apart by the address the trusted proxy recorded (X-Forwarded-For), each with
its own parallel-sequence cap; X-Forwarded-For from an untrusted peer is ignored (the connection's address counts,
a warning says which flag fixes it); a client cannot pick its own address by writing the header itself; no proxy is
trusted unless the host names it (loopback included)."""

from __future__ import annotations

import logging

import httpx
import pytest

from backend import Engine
from backend.hosting import HostingError, HostPolicy
from backend.server import build_app
from tests.helpers import wait_until
from tests.server.conftest import start_server, wait_idle

CAP = 2  # sequences a visitor runs at once


@pytest.fixture(scope="module")
def engine(tiny_model):
    path = tiny_model("llama", max_position_embeddings=4096)
    with Engine(str(path), dtype="float32", num_kv_blocks=1024, max_num_seqs=8) as e:
        yield e


def serve(engine, trusted: tuple[str, ...] | None):
    """A hosted server trusting `trusted` as proxies (None: the policy's default)."""
    options = {} if trusted is None else {"forwarded_allow_ips": trusted}
    policy = HostPolicy.hosted_defaults(max_parallel_per_visitor=CAP, max_new_tokens=None, **options)
    return start_server(build_app(engine, served_model_name="tiny", policy=policy))


def _status(client: httpx.Client, forwarded_for: str) -> int:
    body = {"prompt": "hi", "max_tokens": 2}
    return client.post("/v1/completions", json=body, headers={"X-Forwarded-For": forwarded_for}).status_code


def _hold_the_cap(client: httpx.Client, engine: Engine, forwarded_for: str):
    """A streaming request of `forwarded_for` running CAP sequences (its body unread): the response, once running."""
    body = {"prompt": "hold", "max_tokens": 3000, "n": CAP, "stream": True, "ignore_eos": True}
    request = client.build_request("POST", "/v1/completions", json=body, headers={"X-Forwarded-For": forwarded_for})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    assert wait_until(lambda: engine.stats().num_running == CAP)
    return response


def test_clients_behind_a_trusted_proxy_each_have_their_own_cap(engine):
    server, thread, url = serve(engine, ("127.0.0.1",))  # the test client is the proxy on this machine
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            held = _hold_the_cap(client, engine, "203.0.113.7")
            try:
                assert _status(client, "203.0.113.8") == 200  # another client behind the proxy
                assert _status(client, "203.0.113.7") == 429  # the same one: over its cap
                # a client that writes its own X-Forwarded-For: the proxy appends the address it saw, which counts
                assert _status(client, "198.51.100.1, 203.0.113.7") == 429
            finally:
                held.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    wait_idle(engine)


def _forged_addresses_share_one_cap(engine, trusted: tuple[str, ...] | None) -> None:
    """Served trusting `trusted`, the loopback test client's X-Forwarded-For counts for nothing: whatever address
    it writes, its requests are 127.0.0.1's, one visitor with one cap."""
    server, thread, url = serve(engine, trusted)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            held = _hold_the_cap(client, engine, "203.0.113.7")
            try:
                assert _status(client, "203.0.113.8") == 429
                assert _status(client, "203.0.113.9") == 429
            finally:
                held.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    wait_idle(engine)


def test_forwarded_for_from_an_untrusted_peer_is_ignored_and_logged_once(engine, caplog):
    with caplog.at_level(logging.WARNING):
        _forged_addresses_share_one_cap(engine, ("10.0.0.0/8",))  # the loopback peer is not a trusted proxy
    warnings = [r.getMessage() for r in caplog.records if "X-Forwarded-For" in r.getMessage()]
    assert len(warnings) == 1 and "--forwarded-allow-ips 127.0.0.1" in warnings[0]


def test_loopback_is_not_a_trusted_proxy_unless_named(engine):
    _forged_addresses_share_one_cap(engine, None)  # the default: no proxy trusted, loopback included


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, ()),  # none by default, loopback included: name 127.0.0.1 for a proxy on this machine
        ({"FLAB_FORWARDED_ALLOW_IPS": "10.0.0.0/8, 127.0.0.1"}, ("10.0.0.0/8", "127.0.0.1")),
        ({"FORWARDED_ALLOW_IPS": "172.16.0.1"}, ("172.16.0.1",)),  # uvicorn's variable is honoured
        ({"FLAB_FORWARDED_ALLOW_IPS": "", "FORWARDED_ALLOW_IPS": "172.16.0.1"}, ()),  # ours wins; empty: none
        ({"FORWARDED_ALLOW_IPS": "*"}, ("*",)),  # not hosted: the host's own machine, allowed
    ],
)
def test_trusted_proxies_from_the_environment(environ, expected):
    assert HostPolicy.from_env_and_flags(None, environ).forwarded_allow_ips == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"SPACE_ID": "me/lab", "FORWARDED_ALLOW_IPS": "*"}, "dodge the per-visitor caps"),
        ({"FLAB_FORWARDED_ALLOW_IPS": "my-proxy.local"}, "is not an IP address or network"),
    ],
)
def test_bad_trusted_proxies_are_refused_with_the_reason(environ, message):
    with pytest.raises(HostingError, match=message):
        HostPolicy.from_env_and_flags(None, environ)
