"""The event loop never tokenizes (issue 26, item 7): while one request's prompt is being tokenized (or its ids
detokenized), /health and other clients are answered; and a prompt too many bytes for the token cap is refused
before it is tokenized (backend/server/prompt_size.py)."""

from __future__ import annotations

import threading

import httpx
import pytest

from backend.hosting import HostPolicy
from backend.server import build_app
from backend.server.prompt_size import longest_token_bytes
from tests.server.conftest import SERVED, start_server

GUARD_S = 60  # bounds a hang; the test asserts on order (health answered while tokenizing), never on time
BLOCK_IDS = [7, 7, 7, 7, 7, 7, 7]


@pytest.fixture
def blocked_encode(live, monkeypatch):
    """The live engine's tokenizer.encode blocks until the test releases it -> (started, release)."""
    tokenizer = live.engine.tokenizer
    real_encode, real_decode = tokenizer.encode, tokenizer.decode
    started, release = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(GUARD_S)

    def encode(text, *args, **kwargs):
        if text.startswith("BLOCK"):
            block()
        return real_encode(text, *args, **kwargs)

    def decode(ids, *args, **kwargs):
        if list(ids) == BLOCK_IDS:
            block()
        return real_decode(ids, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    monkeypatch.setattr(tokenizer, "decode", decode)
    yield started, release
    release.set()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/tokenize", {"prompt": "BLOCK hello"}),
        ("/v1/completions", {"prompt": "BLOCK hello", "max_tokens": 2}),
        ("/detokenize", {"tokens": BLOCK_IDS}),
    ],
)
def test_health_is_answered_while_a_prompt_is_tokenized(live, blocked_encode, path, body):
    started, release = blocked_encode
    answers: list[int] = []

    def post() -> None:
        answers.append(httpx.post(live.url + path, json=body, timeout=GUARD_S).status_code)

    slow = threading.Thread(target=post)
    slow.start()
    try:
        assert started.wait(GUARD_S), "the request never reached the tokenizer"
        # the tokenizer is still busy: an event loop doing the tokenizing could not answer this
        assert httpx.get(live.url + "/health", timeout=GUARD_S / 2).status_code == 200
        assert not answers, "the tokenizing request finished first"
    finally:
        release.set()
        slow.join(GUARD_S)
    assert answers == [200]


TOKEN_CAP = 64


@pytest.fixture(scope="module")
def capped(live):
    """A second server over the live engine with a cap of TOKEN_CAP prompt tokens."""
    policy = HostPolicy(max_prompt_tokens=TOKEN_CAP)
    server, thread, url = start_server(build_app(live.engine, served_model_name=SERVED, policy=policy))
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def tokenizer_calls(live, monkeypatch):
    """Every call of the live tokenizer's encode and apply_chat_template, by name."""
    tokenizer = live.engine.tokenizer
    calls: list[str] = []
    for name in ("encode", "apply_chat_template"):
        real = getattr(tokenizer, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(tokenizer, name, spy)
    return calls


def test_a_prompt_over_the_byte_cap_is_refused_before_it_is_tokenized(live, capped, tokenizer_calls):
    limit = TOKEN_CAP * longest_token_bytes(live.engine.tokenizer)
    over = "a" * (limit + 1)
    requests = [
        ("/v1/completions", {"prompt": over, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["short", over], "max_tokens": 2}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": over}], "max_tokens": 2}, "messages"),
        ("/tokenize", {"prompt": over}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": over}]}, "messages"),
    ]
    for path, body, param in requests:
        tokenizer_calls.clear()
        r = httpx.post(capped + path, json=body, timeout=GUARD_S)
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == param, error
        assert f"over {limit} bytes" in error["message"]
        assert "encode" not in tokenizer_calls and "apply_chat_template" not in tokenizer_calls, (path, tokenizer_calls)
    # at the cap in bytes it is tokenized, and refused (or not) by its tokens
    tokenizer_calls.clear()
    r = httpx.post(capped + "/tokenize", json={"prompt": "a" * limit}, timeout=GUARD_S)
    assert "encode" in tokenizer_calls and r.status_code in (200, 400), r.text


def test_the_byte_cap_follows_the_token_cap(live):
    """Without a host cap the token cap is the context (minus one new token): the byte cap grows with it."""
    from backend.server.state import ServerState

    tokenizer = live.engine.tokenizer
    per_token = longest_token_bytes(tokenizer)
    assert per_token == 1 + max(len(tokenizer.convert_tokens_to_string([t]).encode()) for t in tokenizer.get_vocab())
    uncapped = ServerState(live.engine)
    capped = ServerState(live.engine, policy=HostPolicy(max_prompt_tokens=TOKEN_CAP))
    assert uncapped.prompt_token_cap(live.engine) == live.engine.max_model_len - 1
    assert capped.prompt_token_cap(live.engine) == TOKEN_CAP
    assert capped.prompt_bytes.limit(tokenizer, TOKEN_CAP) == TOKEN_CAP * per_token
