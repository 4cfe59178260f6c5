"""The official openai client against a live server over a tiny model: every endpoint and option it sends."""

from __future__ import annotations

import openai
import pytest

from backend import SamplingParams
from tests.server.conftest import SERVED

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(live):
    with openai.OpenAI(base_url=live.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def engine_greedy(engine, prompt: str, n: int, **kw) -> list[int]:
    params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)
    return engine.generate([prompt], params)[0].token_ids


def test_models_lists_the_served_name_and_context(client, live):
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED]
    assert models[0].max_model_len == live.engine.max_model_len
    assert client.models.retrieve(SERVED).id == SERVED


def test_greedy_completion_equals_engine_generate(client, live, http):
    expected = engine_greedy(live.engine, PROMPT, 12)
    r = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text == live.engine.tokenizer.decode(expected, skip_special_tokens=True)
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert (
        r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12 and r.usage.total_tokens == len(ids) + 12
    )


def test_token_id_prompts_and_a_list_of_prompts(client, live):
    ids = live.engine.tokenizer.encode(PROMPT)
    expected = engine_greedy(live.engine, PROMPT, 6)
    r = client.completions.create(
        model=SERVED, prompt=[ids, ids], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.text == live.engine.tokenizer.decode(expected) for c in r.choices)
    assert r.usage.prompt_tokens == 2 * len(ids) and r.usage.completion_tokens == 12


def test_chat_uses_the_template_and_equals_the_engine(client, live):
    messages = [{"role": "user", "content": "hello"}]
    text = live.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = live.engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    expected = live.engine.generate(prompt_token_ids=[ids], sampling_params=params)[0]
    r = client.chat.completions.create(
        model=SERVED, messages=messages, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10


def test_streaming_completion_concatenates_to_the_whole_answer(client):
    whole = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_chat_with_usage(client):
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=SERVED, messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    no_usage = list(client.chat.completions.create(model=SERVED, messages=messages, max_tokens=3, stream=True))
    assert all(c.usage is None for c in no_usage)


def test_stop_string_cuts_the_text(client, live):
    full = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[3:6]
    assert stop and stop in text
    r = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]
    chunks = list(
        client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == text[: text.index(stop)]


def test_n_choices_seeded_are_reproducible_and_differ(client, live):
    kw = dict(
        model=SERVED, prompt=PROMPT, max_tokens=12, temperature=1.0, n=4, seed=1234, extra_body={"ignore_eos": True}
    )
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 48
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    # choice i samples with seed + i: choice 1 of seed s is choice 0 of seed s + 1
    shifted = client.completions.create(**{**kw, "seed": 1235, "n": 1})
    assert shifted.choices[0].text == a.choices[1].text


def test_n_streamed_choices_and_chat_n(client):
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=5, n=3, seed=7, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert finished == {0, 1, 2}
    r = client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}], n=2, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1]


def test_completion_logprobs_match_the_engine(client, live):
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    out = live.engine.generate([PROMPT], params)[0]
    r = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(out.logprobs, abs=1e-4)
    assert len(lp.tokens) == 6 and all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == live.engine.tokenizer.decode(out.token_ids, skip_special_tokens=False)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    echo = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=1)
    assert echo.choices[0].text.startswith(PROMPT)
    assert echo.choices[0].logprobs.token_logprobs[0] is None  # the first prompt token has no prefix


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token for t in content)
    streamed = list(
        client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0,
            logprobs=True, top_logprobs=2, stream=True,
        )
    )  # fmt: skip
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_sampling_options_are_accepted(client):
    r = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=6, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=3, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2},
    )  # fmt: skip
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
