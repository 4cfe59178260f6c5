"""Bad requests are 4xx with an OpenAI error body; a request that fails in the engine is a 5xx alone."""

from __future__ import annotations

import dataclasses

import httpx
import openai
import pytest

from backend import Engine
from backend.server import build_app
from tests.server.conftest import SERVED, TEMPLATE, start_server


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 10**6}, "n"),
        ({"prompt": "x", "seed": -5}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
        ({"prompt": "x", "logit_bias": {"1": 2}}, "logit_bias"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param=param)


def test_malformed_json_and_non_object_bodies(http):
    assert_error(
        http.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"}), 400
    )
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/chat/completions", content=b"not json"), 400)


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "model_not_found", "model")
    assert_error(http.get("/v1/models/gpt-9"), 404, "model_not_found")
    assert_error(http.get("/no/such/route"), 404)


def test_prompt_too_long_for_the_context(http, live):
    ids = [5] * live.engine.max_model_len
    assert_error(http.post("/v1/completions", json={"prompt": ids}), 400, "context_length_exceeded")
    short = [5] * 10
    err = assert_error(
        http.post("/v1/completions", json={"prompt": short, "max_tokens": live.engine.max_model_len}),
        400,
        "context_length_exceeded",
        "max_tokens",
    )
    assert str(live.engine.max_model_len) in err["message"]
    long_chat = {"messages": [{"role": "user", "content": "word " * live.engine.max_model_len}]}
    assert_error(http.post("/v1/chat/completions", json=long_chat), 400, "context_length_exceeded")


def test_bad_chat_requests(http):
    assert_error(http.post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    bad_role = {"messages": [{"role": "wizard", "content": "x"}]}
    assert_error(http.post("/v1/chat/completions", json=bad_role), 400)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_error(http.post("/v1/chat/completions", json=image), 400, "unsupported_content")
    tools = {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert_error(http.post("/v1/chat/completions", json=tools), 400, param="tools")
    top = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert_error(http.post("/v1/chat/completions", json=top), 400, param="top_logprobs")
    surrogate = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    assert_error(
        http.post("/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"}), 400
    )


def test_tokenize_and_detokenize(http, live):
    r = http.post("/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == live.engine.tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == live.engine.tokenizer.decode(
        r["tokens"]
    )
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 1
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400)
    assert_error(http.post("/tokenize", json={}), 400)


def test_openapi_document_and_health(http):
    doc = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"} <= set(doc["paths"])
    assert http.get("/health").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def keyed_no_template(tiny_model, tmp_path_factory):
    """A server with an API key over a copy of the tiny model whose tokenizer has no chat template."""
    import shutil

    folder = tmp_path_factory.mktemp("no-template")
    shutil.copytree(tiny_model("llama"), folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").unlink()
    engine = Engine(str(folder), dtype="float32", num_kv_blocks=64)
    assert not getattr(engine.tokenizer, "chat_template", None)
    server, thread, url = start_server(build_app(engine, SERVED, api_key="sekret"))
    yield engine, url
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def test_api_key_is_required(keyed_no_template):
    _, url = keyed_no_template
    with httpx.Client(base_url=url, timeout=30) as c:
        assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_chat_without_a_template_is_a_clear_400(keyed_no_template):
    _, url = keyed_no_template
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="chat-template"):
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}])
    assert client.completions.create(model=SERVED, prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_chat_template_flag_is_used(tiny_model, keyed_no_template):
    engine, _ = keyed_no_template
    server, thread, url = start_server(build_app(engine, SERVED, chat_template=TEMPLATE))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        expected = engine.tokenizer("<|user|>hi<|eos|><|assistant|>", add_special_tokens=False)["input_ids"]
        assert r.usage.prompt_tokens == len(expected)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def poisoned(sink, engine):
    """A sink that hands on one delta, then fails the request as the engine does for a failed request (the engine
    pushes deltas to the server's sink)."""
    sent: list[int] = []

    def push(delta):
        if not sent:
            sent.append(delta.request_id)
            return sink(delta)
        if len(sent) == 1:
            sent.append(delta.request_id)
            engine.abort(delta.request_id)
            error = "RequestFailedError: sampling failed: injected fault"
            output = dataclasses.replace(delta.output, finished=True, finish_reason="error", error=error)
            return sink(
                dataclasses.replace(delta, text="", token_ids=[], finished=True, finish_reason="error", output=output)
            )

    return push


def test_an_engine_failure_fails_that_request_alone(live, http, monkeypatch):
    real_open = live.engine.open_stream

    def open_stream(prompt=None, params=None, prompt_token_ids=None, owner=None, sink=None):
        if params.max_new_tokens == 7:  # 7: the poisoned request
            sink = poisoned(sink, live.engine)
        return real_open(prompt, params, prompt_token_ids, owner=owner, sink=sink)

    monkeypatch.setattr(live.engine, "open_stream", open_stream)
    err = assert_error(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 7}), 500, "request_failed")
    assert "injected fault" in err["message"]
    events = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 7, "stream": True}).text
    assert "injected fault" in events and events.rstrip().endswith("data: [DONE]")
    ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
    assert http.get("/health").status_code == 200
