"""Hostile request bodies (hypothesis, bounded): arbitrary JSON and near-valid bodies built from the request
models' fields. Never a 5xx, always an OpenAI error body on a 4xx, and the server healthy after."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import wait_idle

PATHS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
numbers = (
    st.none() | st.integers(-5, 10**12) | st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([-1, 0, 1, 2**63])
)
small_text = st.text(max_size=20)
prompt = st.one_of(
    small_text,
    st.lists(small_text, max_size=3),
    st.lists(st.integers(-3, 700), max_size=8),
    st.lists(st.lists(st.integers(-3, 700), max_size=4), max_size=2),
    json_values,
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
        "content": st.one_of(small_text, json_values),
    }
)
sampling = {
    "max_tokens": st.none() | st.integers(-2, 8) | st.just(10**9),
    "temperature": numbers,
    "top_p": numbers,
    "top_k": numbers,
    "min_p": numbers,
    "n": st.none() | st.integers(-1, 3) | st.just(10**6),
    "seed": numbers,
    "stop": st.none() | small_text | st.lists(small_text, max_size=3) | json_values,
    "logprobs": st.none() | st.booleans() | st.integers(-1, 25),
    "top_logprobs": st.none() | st.integers(-1, 25),
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "repetition_penalty": numbers,
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "model": st.none() | st.sampled_from(["tiny-llama", "other"]),
    "echo": st.booleans(),
    "ignore_eos": st.booleans(),
    "max_completion_tokens": st.none() | st.integers(-1, 8),
}


@st.composite
def near_valid(draw) -> tuple[str, dict]:
    path = draw(st.sampled_from(PATHS))
    body = {k: draw(v) for k, v in sampling.items() if draw(st.booleans())}
    if path == "/v1/chat/completions" or (path == "/tokenize" and draw(st.booleans())):
        body["messages"] = draw(st.lists(message, max_size=3) | json_values)
    elif path == "/detokenize":
        body["tokens"] = draw(st.lists(st.integers(-3, 10**6), max_size=6) | json_values)
    else:
        body["prompt"] = draw(prompt)
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2  # keep each generation short
    return path, body


def check(http, path: str, content: bytes) -> None:
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (path, content[:300], r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif "text/event-stream" in r.headers.get("content-type", ""):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text[-500:]


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(case=near_valid())
def test_near_valid_bodies(http, case):
    path, body = case
    check(http, path, json.dumps(body).encode())


@FUZZ
@given(path=st.sampled_from(PATHS), body=json_values | st.binary(max_size=40).map(lambda b: b))
def test_arbitrary_bodies(http, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    check(http, path, content)


def test_healthy_after_the_fuzz(http, live):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    wait_idle(live.engine)
    live.engine.check_invariants()
