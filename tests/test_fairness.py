"""Fair scheduling across owners: one owner with many long requests cannot starve another's short one.
Measured in engine steps (deterministic), not wall time."""

from __future__ import annotations

import pytest

from backend import Engine, SamplingParams

HOG = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


def steps_to_first_token(engine: Engine, short_owner: str | None, hog_owner: str | None, hogs: int) -> int:
    for i in range(hogs):
        engine.add_request(prompt_token_ids=[5 + i % 50] * 100, params=HOG, owner=hog_owner)
    short = engine.add_request(prompt_token_ids=[7, 8, 9, 10, 11, 12, 13, 14], params=SHORT, owner=short_owner)
    steps, first = 0, None
    while engine.has_unfinished():
        steps += 1
        for delta in engine.step():
            if delta.request_id == short and delta.token_ids and first is None:
                first = steps
    assert engine.stats().kv_blocks_used == 0 and engine.num_requests == 0
    return first


@pytest.fixture(scope="module")
def model(tiny_model):
    return str(tiny_model("llama"))


def test_a_short_request_is_not_starved_by_a_greedy_owner(model):
    opts = dict(dtype="float32", max_model_len=256, max_num_batched_tokens=64, max_num_seqs=32)
    with Engine(model, **opts) as engine:
        alone = steps_to_first_token(engine, "short", "hog", hogs=0)
        fifo = steps_to_first_token(engine, None, None, hogs=24)  # one anonymous owner: plain FIFO
        fair = steps_to_first_token(engine, "short", "hog", hogs=24)
    with Engine(model, max_running_per_owner=4, **opts) as engine:
        capped = steps_to_first_token(engine, "short", "hog", hogs=24)
    print(f"\nsteps to the short request's first token: alone {alone}, FIFO {fifo}, fair {fair}, capped {capped}")
    assert alone == 1
    assert fair <= 2 and capped <= 2  # admitted at once, with half of the step's budget
    assert fifo > 20  # behind 24 prompts of 100 tokens at 64 tokens per step


def test_the_cap_limits_one_owners_running_sequences(model):
    with Engine(model, dtype="float32", max_model_len=256, max_running_per_owner=3) as engine:
        for _ in range(8):
            engine.add_request(prompt_token_ids=[5] * 20, params=HOG, owner="hog")
        engine.add_request(prompt_token_ids=[6] * 20, params=HOG, owner="other")
        engine.step()
        stats = engine.stats()
        assert stats.num_running == 4 and stats.num_waiting == 5  # 3 of the hog's, 1 of the other's
        while engine.has_unfinished():
            engine.step()
            assert engine.stats().num_running <= 4
