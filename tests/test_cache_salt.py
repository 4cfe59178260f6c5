"""The per-request cache_salt through the engine's API: requests share prefix-cache blocks only with the same
salt; outputs do not change."""

from __future__ import annotations

import pytest

from backend import Engine, SamplingParams
from backend.core.errors import RequestError

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = list(range(5, 30))  # 25 tokens: 3 full blocks of 8


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=64, num_kv_blocks=32, block_size=8) as e:
        yield e


def _hits(engine, run) -> tuple[list[int], int]:
    before = engine.stats().prefix_hit_blocks
    tokens = run()
    return tokens, engine.stats().prefix_hit_blocks - before


def test_salts_keep_prefix_blocks_apart_and_outputs_equal(engine):
    engine.reset_prefix_cache()

    def salted(salt: str | None) -> list[int]:
        return engine.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY, cache_salt=salt)[0].token_ids

    plain, hits = _hits(engine, lambda: salted(None))
    assert hits == 0

    assert _hits(engine, lambda: salted("alice")) == (plain, 0)
    assert _hits(engine, lambda: salted("bob")) == (plain, 0)
    assert _hits(engine, lambda: salted("alice")) == (plain, 3)
    assert _hits(engine, lambda: salted(None)) == (plain, 3)


def test_the_salt_reaches_every_entry_point(engine):
    engine.reset_prefix_cache()
    engine.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY, cache_salt="s")
    streamed, hits = _hits(
        engine,
        lambda: [t for d in engine.stream(prompt_token_ids=PROMPT, params=GREEDY, cache_salt="s") for t in d.token_ids],
    )
    assert hits == 3
    with engine.open_stream(prompt_token_ids=PROMPT, params=GREEDY, cache_salt="t") as handle:
        assert [t for d in handle for t in d.token_ids] == streamed
    engine.add_request(prompt_token_ids=PROMPT, params=GREEDY, cache_salt="t")
    before = engine.stats().prefix_hit_blocks
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().prefix_hit_blocks - before == 3


@pytest.mark.parametrize("salt", [1, b"x", ["a"]])
def test_a_salt_that_is_not_a_string_is_refused(engine, salt):
    with pytest.raises(RequestError, match="cache_salt"):
        engine.add_request(prompt_token_ids=PROMPT, params=GREEDY, cache_salt=salt)
