"""Sampling: seeds, stop conditions, logprobs against HF logits, parameter validation."""

import pytest
import torch

from backend import Engine, SamplingParams
from backend.core.errors import RequestError
from backend.core.sampling import _filter
from tests.helpers import hf_logits


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", model_impl="transformers") as e:
        yield e


def test_same_seed_same_output_independent_of_batch(engine):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate(["Hello world"], p)[0].token_ids
    batched = engine.generate(
        ["Hello world", "The quick brown fox", "1 2 3"],
        [p, SamplingParams(max_new_tokens=5, seed=7), SamplingParams(max_new_tokens=9)],
    )
    assert batched[0].token_ids == alone
    other = engine.generate(
        ["Hello world"], SamplingParams(max_new_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    )[0].token_ids
    assert other != alone  # a different seed samples differently (with overwhelming probability)


def test_logprobs_match_hf_log_softmax(engine, tiny_model):
    prompt = "The quick brown fox"
    out = engine.generate([prompt], SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    full = out.prompt_token_ids + out.token_ids
    ref = torch.log_softmax(hf_logits(tiny_model("llama"), full), dim=-1)
    n = len(out.prompt_token_ids)
    for i, tok in enumerate(out.token_ids):
        expected = ref[n - 1 + i]
        assert out.logprobs[i] == pytest.approx(expected[tok].item(), abs=1e-4)
        top_ids = [t for t, _ in out.top_logprobs[i]]
        assert top_ids == torch.topk(expected, 3).indices.tolist()
        assert top_ids[0] == tok  # greedy picks the top token


def test_stop_strings_cut_the_text(engine):
    base = engine.generate(["Hello world"], SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True))[0]
    text = base.text
    assert len(text) > 4
    stop = text[2:4]
    out = engine.generate(
        ["Hello world"], SamplingParams(max_new_tokens=16, temperature=0.0, stop=[stop], ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.find(stop)]
    assert stop not in out.text


def test_stop_token_ids_and_max_new_tokens(engine):
    base = engine.generate(["1 2 3"], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 8
    stop_tok = base.token_ids[3]
    out = engine.generate(
        ["1 2 3"], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[stop_tok], ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]


def test_eos_stops_unless_ignored(engine, tiny_model):
    base = engine.generate(["1 2 3"], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))[0]
    fake_eos = base.token_ids[2]  # the same weights, saved with this token as the model's EOS
    with Engine(str(tiny_model("llama", eos_token_id=fake_eos)), dtype="float32", model_impl="transformers") as other:
        stopped = other.generate(["1 2 3"], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
        ignored = other.generate(["1 2 3"], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == base.token_ids[: base.token_ids.index(fake_eos) + 1]
    assert ignored.token_ids == base.token_ids


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert torch.isfinite(_filter(logits, SamplingParams(top_k=2))).tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, -1)  # [0.636, 0.234, 0.086, 0.032, 0.012]
    kept = torch.isfinite(_filter(logits, SamplingParams(top_p=0.8))).tolist()
    assert kept == [True, True, False, False, False]
    kept = torch.isfinite(_filter(logits, SamplingParams(min_p=0.1))).tolist()
    assert kept == [p >= 0.1 * probs.max() for p in probs.tolist()]


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate(["1 2 3"], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))[0]
    penal = engine.generate(
        ["1 2 3"], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=5.0)
    )[0]
    assert len(set(penal.token_ids)) >= len(set(plain.token_ids))
    assert penal.token_ids != plain.token_ids or len(set(plain.token_ids)) == len(plain.token_ids)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=1.0),
        dict(repetition_penalty=0),
        dict(logprobs=100),
        dict(stop=[""]),
    ],
)
def test_invalid_sampling_values_are_rejected(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)
