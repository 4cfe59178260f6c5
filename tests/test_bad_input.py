"""Every bad input is a clear error of a documented type (EngineError subclasses), naming the value; the
engine keeps serving. Listed cases first, then property-based fuzz with arbitrary Python values."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend import Engine, EngineConfig, SamplingParams
from backend.core.errors import EngineError, RequestError
from backend.core.stop import REWRITE_SLACK, StopMatcher

GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=64) as e:
        yield e


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed="abc"), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=2**70), "seed"),
        (dict(seed=True), "seed"),
        (dict(temperature=None), "temperature"),
        (dict(temperature="0.5"), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("inf")), "top_p"),
        (dict(stop=None), "stop"),
        (dict(stop=[1]), "stop"),
        (dict(stop=["\ud800"]), "Unicode"),
        (dict(stop_token_ids=None), "stop_token_ids"),
        (dict(stop_token_ids=[True]), "stop_token_ids"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(repetition_penalty=1e-45), "repetition_penalty"),
        (dict(presence_penalty=5), "presence_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_kv_blocks=1.5), "num_kv_blocks"),
        (dict(num_kv_blocks="10"), "num_kv_blocks"),
        (dict(num_kv_blocks=0), "num_kv_blocks"),
        (dict(kv_cache_memory_gb=float("nan")), "kv_cache_memory_gb"),
        (dict(kv_cache_memory_gb="1"), "kv_cache_memory_gb"),
        (dict(max_model_len=1.5), "max_model_len"),
        (dict(block_size=True), "block_size"),
        (dict(block_size=12), "block_size"),
        (dict(max_num_seqs=-1), "max_num_seqs"),
        (dict(seed=-1), "seed"),
        (dict(trust_remote_code="yes"), "trust_remote_code"),
        (dict(model_impl=3), "model_impl"),
        (dict(dtype="float64"), "dtype"),
        (dict(quantization=8), "quantization"),
        (dict(bogus=1), "unknown engine option"),
    ],
)
def test_bad_engine_config(kwargs, match):
    with pytest.raises(EngineError, match=match):
        EngineConfig.from_kwargs("some/model", **kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e: e.generate(123), "prompts must be"),
        (lambda e: e.generate([123]), "prompt must be a string"),
        (lambda e: e.generate(["a\ud800b"]), "lone surrogate"),
        (lambda e: e.generate(prompt_token_ids=[5, 6, 7]), "list of token id lists"),
        (lambda e: e.generate(prompt_token_ids=[[True, 5]]), "integers"),
        (lambda e: e.generate(prompt_token_ids=[[5.0]]), "integers"),
        (lambda e: e.generate(prompt_token_ids=[[]]), "empty"),
        (lambda e: e.generate(prompt_token_ids=["abc"]), "list"),
        (lambda e: e.generate(["a"], "greedy"), "SamplingParams"),
        (lambda e: e.generate(["a", "b"], [GREEDY]), "one per prompt"),
        (lambda e: e.generate(["a"], prompt_token_ids=[[1]]), "not both"),
    ],
)
def test_bad_requests_are_clear_errors_and_queue_nothing(engine, call, match):
    with pytest.raises(RequestError, match=match):
        call(engine)
    assert engine.num_requests == 0 and engine.stats().kv_blocks_used == 0
    assert len(engine.generate(["Hello"], GREEDY)[0].token_ids) == 4


def test_describe_after_close(tiny_model):
    e = Engine(str(tiny_model("llama")), dtype="float32", max_model_len=64)
    before = e.describe()
    e.close()
    assert e.describe() == before and e.closed
    with pytest.raises(RequestError, match="closed"):
        e.generate(["Hello"], GREEDY)


def test_stop_strings_are_matched_incrementally():
    m = StopMatcher(("END", "halt now"))
    text = ""
    windows = []
    for piece in ["Once upon ", "a time it was E", "N", "D of story"]:
        windows.append(len(text) + len(piece) - max(0, len(text) - m.hold - REWRITE_SLACK))
        text += piece
        hit = m.found(text)
    assert hit  # "END" spans three pieces
    assert m.first(text) == text.index("END")
    # each search window is the new text plus a bounded overlap, however long the text already is
    pieces = ["Once upon ", "a time it was E", "N", "D of story"]
    assert all(w <= len(p) + m.hold + REWRITE_SLACK for w, p in zip(windows, pieces))
    long = StopMatcher(("zz",))
    assert not long.found("a" * 100_000 + "z")
    assert long.found("a" * 100_000 + "zz")  # the stop string straddles the previous search's end


def test_many_stop_strings_are_served(engine):
    stops = tuple(f"never-{i}" for i in range(2000))
    out = engine.generate(["Hello"], SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True, stop=stops))
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 24


# --- property-based fuzz ---------------------------------------------------------------------------

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 600), st.text(max_size=3), st.booleans()), max_size=4),
)
PARAM_NAMES = [
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "prompt_logprobs",
    "skip_special_tokens",
]
CONFIG_NAMES = [
    "model_impl",
    "quantization",
    "dtype",
    "device",
    "block_size",
    "kv_cache_memory_gb",
    "num_kv_blocks",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "attention_backend",
    "cpu_linear",
    "cpu_kernels",
    "seed",
    "trust_remote_code",
    "enable_prefix_caching",
]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.dictionaries(st.sampled_from(PARAM_NAMES), ANY, max_size=4))
def test_fuzz_sampling_params_only_raise_request_error(kwargs):
    try:
        p = SamplingParams(**kwargs)
    except RequestError:
        return
    assert p.max_new_tokens >= 1 and math.isfinite(p.temperature)


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_NAMES), ANY, max_size=4))
def test_fuzz_engine_config_only_raises_engine_error(kwargs):
    try:
        EngineConfig.from_kwargs("some/model", **kwargs)
    except EngineError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prompt=st.one_of(ANY, st.lists(ANY, max_size=3)),
    ids=st.one_of(st.none(), ANY, st.lists(ANY, max_size=3)),
    params=st.dictionaries(st.sampled_from(PARAM_NAMES), ANY, max_size=3),
)
def test_fuzz_request_api_only_raises_documented_errors_and_keeps_serving(engine, prompt, ids, params):
    try:
        p = SamplingParams(**{**params, "max_new_tokens": 2})
        if ids is not None:
            engine.generate(prompt_token_ids=ids, sampling_params=p)
        else:
            engine.generate(prompt, p)
    except EngineError:
        pass
    assert engine.num_requests == 0 and engine.stats().kv_blocks_used == 0
