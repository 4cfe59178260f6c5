"""One request never harms another: faults injected into one request's sampling, its stop handling and the
step itself, while other requests stream; numerically extreme sampling values; a dead engine loop."""

from __future__ import annotations

import dataclasses
import threading

import pytest

import backend.core.engine as engine_module
import backend.core.sampling as sampling
import backend.core.stop as stop
from backend import Engine, SamplingParams
from backend.core.errors import RequestError, RequestFailedError

PROMPTS = ["Hello world", "1 2 3 4", "The quick brown fox", "a b c"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
JOIN_S = 60  # bound on every thread join: a hang fails the test instead of blocking CI


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=128, num_kv_blocks=64, block_size=8) as e:
        yield e


@pytest.fixture(scope="module")
def expected(engine):
    return {p: engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS}


def _stream_all(engine, jobs: list[tuple[str, SamplingParams]]) -> dict[int, list[int] | Exception]:
    """Stream every job in its own thread; the tokens (or the exception) of each, by index."""
    results: dict[int, list[int] | Exception] = {}
    start = threading.Barrier(len(jobs))

    def run(i, prompt, params):
        start.wait(timeout=JOIN_S)
        try:
            results[i] = [t for d in engine.stream(prompt, params) for t in d.token_ids]
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, *job), daemon=True) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    return results


def _assert_clean(engine) -> None:
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    assert engine.num_requests == 0
    engine.check_invariants()


def test_failing_sampling_fails_that_request_alone(engine, expected, monkeypatch):
    real = sampling._draw

    def flaky(generator, device):  # the per-row part of the batched sampler: the row's own random number
        if generator is not None and generator.initial_seed() == 666:
            raise RuntimeError("injected sampling fault")
        return real(generator, device)

    monkeypatch.setattr(sampling, "_draw", flaky)
    bad = SamplingParams(max_new_tokens=12, temperature=0.7, seed=666)
    results = _stream_all(engine, [(p, GREEDY) for p in PROMPTS] + [("Hello world", bad)])
    assert isinstance(results[len(PROMPTS)], RequestFailedError)
    assert "injected sampling fault" in str(results[len(PROMPTS)])
    assert {PROMPTS[i]: results[i] for i in range(len(PROMPTS))} == expected
    _assert_clean(engine)


def test_failing_stop_handling_fails_that_request_alone(engine, expected, monkeypatch):
    real = stop.StopMatcher.found

    def flaky(self, text):
        if "BOOM" in self.stops:
            raise ValueError("injected stop fault")
        return real(self, text)

    monkeypatch.setattr(stop.StopMatcher, "found", flaky)
    bad = dataclasses.replace(GREEDY, stop=("BOOM",))
    results = _stream_all(engine, [(p, GREEDY) for p in PROMPTS] + [("1 2 3 4", bad)])
    assert isinstance(results[len(PROMPTS)], RequestFailedError)
    assert {PROMPTS[i]: results[i] for i in range(len(PROMPTS))} == expected
    _assert_clean(engine)


def test_failing_request_in_generate_raises_and_the_rest_finish(engine, expected, monkeypatch):
    real = stop.StopMatcher.found
    monkeypatch.setattr(
        stop.StopMatcher,
        "found",
        lambda self, text: (_ for _ in ()).throw(ValueError("x")) if self.stops else real(self, text),
    )
    bad = dataclasses.replace(GREEDY, stop=("BOOM",))
    with pytest.raises(RequestFailedError, match="1 of 2 requests failed"):
        engine.generate(["Hello world", "a b c"], [bad, GREEDY])
    _assert_clean(engine)
    monkeypatch.undo()
    assert engine.generate(["a b c"], GREEDY)[0].token_ids == expected["a b c"]


def test_exception_in_the_step_fails_that_step_and_the_engine_keeps_serving(tiny_model, monkeypatch):
    # max_num_seqs=2: two requests run, the others wait; the one failing step fails only the two running
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=128, max_num_seqs=2) as engine:
        expected = {p: engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS}
        real = engine_module.step_stats  # the step's own bookkeeping (was Engine._record)
        calls = {"n": 0}

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected step fault")
            return real(*args)

        monkeypatch.setattr(engine_module, "step_stats", flaky)
        results = _stream_all(engine, [(p, GREEDY) for p in PROMPTS])
        failed = [i for i, r in results.items() if isinstance(r, Exception)]
        assert len(failed) == 2 and all("injected step fault" in str(results[i]) for i in failed)
        assert all(results[i] == expected[PROMPTS[i]] for i in results if i not in failed)
        _assert_clean(engine)
        assert engine.generate(["Hello world"], GREEDY)[0].token_ids == expected["Hello world"]


def test_a_model_forward_failure_fails_its_batch_loudly(engine, expected, monkeypatch):
    from backend.core.runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "run", lambda self, batch: (_ for _ in ()).throw(RuntimeError("forward broke")))
    with pytest.raises(RequestFailedError, match="forward broke"):
        engine.generate(["Hello world"], GREEDY)
    monkeypatch.undo()
    _assert_clean(engine)
    assert engine.generate(["Hello world"], GREEDY)[0].token_ids == expected["Hello world"]


def test_tiny_temperature_is_greedy_and_harms_no_one(engine, expected):
    tiny = dataclasses.replace(GREEDY, temperature=1e-40, seed=1)
    outs = engine.generate(PROMPTS + ["Hello world"], [GREEDY] * len(PROMPTS) + [tiny])
    assert [o.token_ids for o in outs[:-1]] == [expected[p] for p in PROMPTS]
    assert outs[-1].token_ids == expected["Hello world"]


@pytest.mark.parametrize("temperature", [1e-4, 1e-3, 50.0, 1e6])
def test_extreme_but_valid_values_sample_finite_tokens(engine, temperature):
    params = SamplingParams(max_new_tokens=6, temperature=temperature, seed=3, repetition_penalty=100.0, top_p=1e-9)
    out = engine.generate(["Hello world"], params)[0]
    assert len(out.token_ids) == 6 and all(0 <= t < engine.vocab_size for t in out.token_ids)


def test_sampling_params_are_frozen():
    p = SamplingParams(stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stop = None
    assert p.stop == ("x",)
    with pytest.raises(RequestError, match="stop"):
        dataclasses.replace(p, stop=None)


def test_a_stream_raises_when_the_engine_loop_died(tiny_model, monkeypatch):
    monkeypatch.setattr(Engine, "_run_loop", lambda self: None)  # the loop thread exits at once, as if crashed
    monkeypatch.setattr("backend.core.streams.LISTENER_POLL_S", 0.05)
    result: dict = {}
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=128) as engine:

        def consume():
            try:
                result["tokens"] = [t for d in engine.stream("Hello world", GREEDY) for t in d.token_ids]
            except Exception as e:
                result["error"] = e

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        t.join(timeout=JOIN_S)
        assert not t.is_alive(), "stream() waited forever on a dead engine loop"
        assert isinstance(result.get("error"), RequestFailedError), result
        _assert_clean(engine)  # the aborted request freed everything
