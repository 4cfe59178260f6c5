"""The batched sampler alone (backend/core/sampling.py), no model: per-row seeds, filters per row, penalties,
numerical safety, logprobs, and a failing row failing alone."""

from __future__ import annotations

import pytest
import torch

import backend.core.sampling as sampling
from backend.core.sampling import SamplingParams, sample

V = 64


def _logits(b: int, seed: int = 0) -> torch.Tensor:  # (B, V)
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def _gens(seeds: list[int | None]) -> list[torch.Generator | None]:
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def test_a_seeded_row_samples_the_same_whatever_the_batch():
    logits = _logits(8)
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=5)
    alone = [sample(logits[3:4], [p], _gens([5])).token_ids[0] for _ in range(3)]
    others = [SamplingParams(temperature=t, top_p=0.5, min_p=0.1) for t in (0.3, 0.0, 2.0)]
    params = others[:2] + [p] + others[2:]
    batch = sample(logits[1:5], params, _gens([1, None, 5, 2])).token_ids
    assert batch[2] == alone[0] == alone[1] == alone[2]


def test_rows_follow_their_own_filters():
    logits = _logits(4)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),  # top_k=1 is greedy
        SamplingParams(temperature=5.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=1e-6),  # keeps the best token alone
    ]
    for seed in range(20):
        out = sample(logits, params, _gens([None, seed, seed, seed])).token_ids
        best = logits.argmax(-1).tolist()
        assert out[0] == best[0] and out[1] == best[1] and out[3] == best[3]
        assert out[2] in torch.topk(logits[2], 3).indices.tolist()


def test_batched_filters_equal_each_row_alone():
    logits = _logits(5, seed=1)
    params = [
        SamplingParams(top_k=5),
        SamplingParams(top_p=0.7),
        SamplingParams(min_p=0.2),
        SamplingParams(top_k=10, top_p=0.5, min_p=0.05),
        SamplingParams(),
    ]
    batched = sampling._filter_rows(logits, sampling.RowSettings.of(params, V, logits.device))
    for row, p in enumerate(params):
        assert torch.equal(batched[row], sampling._filter(logits[row], p))


def test_top_p_widens_past_its_first_candidates(monkeypatch):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 2)
    flat = torch.zeros(1, V)  # every token equally likely: 0.9 of the mass is 58 tokens (mass before < 0.9)
    kept = torch.isfinite(sampling._filter(flat[0], SamplingParams(top_p=0.9))).sum()
    assert int(kept) == V  # ties with the last kept token stay
    logits = torch.arange(V, dtype=torch.float32).flip(0) / 8  # a slow decay: top-p needs many tokens
    full = torch.softmax(logits, -1).cumsum(-1)
    expected = int((full - torch.softmax(logits, -1) < 0.95).sum())
    assert int(torch.isfinite(sampling._filter(logits, SamplingParams(top_p=0.95))).sum()) == expected


def _penalized_reference(logits, p, prompt, output):  # the per-row rule, written plainly
    logits = logits.clone()
    for t in set(prompt + output):
        if p.repetition_penalty != 1.0:
            s = logits[t]
            logits[t] = s / p.repetition_penalty if s > 0 else s * p.repetition_penalty
    for t in set(output):
        logits[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return logits


def test_penalties_over_the_batch_equal_the_per_row_rule():
    logits = _logits(3, seed=2)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=-0.7),
        SamplingParams(),
    ]
    prompts, outputs = [[1, 2, 3], [4, 4, 5], [6]], [[3, 3, 9], [5, 5, 5, 7], []]
    got = sampling._apply_penalties(logits.clone(), params, prompts, outputs)
    for row, p in enumerate(params):
        assert torch.allclose(got[row], _penalized_reference(logits[row], p, prompts[row], outputs[row]))


@pytest.mark.parametrize("temperature", [1e-4, 50.0, 1e6])
def test_extreme_values_and_bad_logits_give_real_tokens(temperature):
    logits = _logits(3)
    logits[1] = float("nan")
    logits[1, 7] = 1.0  # NaN logits: the row falls back to the best real one
    logits[2] = float("-inf")
    params = [SamplingParams(temperature=temperature, top_p=1e-9, repetition_penalty=100.0)] * 3
    out = sample(logits, params, _gens([1, 2, 3]), [[1, 2]] * 3, [[3]] * 3).token_ids
    assert all(0 <= t < V for t in out) and out[1] == 7


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.full((1, V), float("-inf"))
    logits[0, [5, 40]] = 0.0
    drawn = {sample(logits, [SamplingParams(seed=s)], _gens([s])).token_ids[0] for s in range(50)}
    assert drawn == {5, 40}


def test_logprobs_are_the_raw_distributions():
    logits = _logits(3)
    params = [SamplingParams(logprobs=3), SamplingParams(temperature=0.0), SamplingParams(logprobs=0, seed=1)]
    out = sample(logits, params, _gens([0, None, 1]))
    ref = torch.log_softmax(logits, -1)
    for row in range(3):
        assert out.logprobs[row] == pytest.approx(float(ref[row, out.token_ids[row]]), abs=1e-6)
    assert [t for t, _ in out.top_logprobs[0]] == torch.topk(ref[0], 3).indices.tolist()
    assert out.top_logprobs[1] is None and out.top_logprobs[2] is None


def test_a_row_that_fails_fails_alone(monkeypatch):
    real = sampling._sample_rows

    def fails_on_nans(logits, s, uniforms):  # this fault hits the batch pass and the one bad row alone
        if bool(torch.isnan(logits).any()):
            raise RuntimeError("bad row")
        return real(logits, s, uniforms)

    monkeypatch.setattr(sampling, "_sample_rows", fails_on_nans)
    logits = _logits(3)
    logits[1, 0] = float("nan")
    out = sample(logits, [SamplingParams(seed=s) for s in range(3)], _gens([0, 1, 2]))
    assert list(out.errors) == [1] and "bad row" in out.errors[1]
    alone = sample(logits[2:3], [SamplingParams(seed=2)], _gens([2])).token_ids[0]
    assert out.token_ids[2] == alone


def test_a_seed_is_one_draw_per_step():
    logits = _logits(1)
    g = torch.Generator().manual_seed(9)
    first = [sample(logits, [SamplingParams(seed=9)], [g]).token_ids[0] for _ in range(5)]
    g = torch.Generator().manual_seed(9)
    again = [sample(logits, [SamplingParams(seed=9)], [g]).token_ids[0] for _ in range(5)]
    assert first == again
