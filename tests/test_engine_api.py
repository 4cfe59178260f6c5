"""The Engine API: token-id prompts, streaming, abort, concurrency, metrics, bad input."""

import threading

import pytest

from backend import Engine, SamplingParams
from backend.core.errors import EngineError, KVCacheError, ModelNotFoundError, RequestError, UnsupportedModelError

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=128) as e:
        yield e


def test_generate_from_token_ids_equals_text(engine):
    text = engine.generate(["Hello world"], GREEDY)[0]
    ids = engine.generate(prompt_token_ids=[text.prompt_token_ids], sampling_params=GREEDY)[0]
    assert ids.token_ids == text.token_ids
    assert ids.text == text.text and ids.finish_reason == "length"


def test_stream_yields_deltas_that_add_up(engine):
    full = engine.generate(["Once upon a time"], GREEDY)[0]
    deltas = list(engine.stream("Once upon a time", GREEDY))
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert "".join(d.text for d in deltas) == full.text
    assert any(d.stats is not None and d.stats.kv_blocks_total > 0 for d in deltas)


def test_breaking_out_of_a_stream_aborts_and_frees_blocks(engine):
    stream = engine.stream("The quick brown fox", SamplingParams(max_new_tokens=100, ignore_eos=True))
    next(stream)
    stream.close()  # like `break` in a for loop: the generator aborts the request on the spot
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0
    assert engine.num_requests == 0
    engine.check_invariants()


def test_open_stream_gives_the_id_at_once_and_a_queued_request_aborts_before_its_first_token(tiny_model):
    """One running slot, held by a long request: the queued one's handle aborts it while it waits (no token, its
    final delta says abort at once), and the long one keeps running."""
    path = tiny_model("llama", max_position_embeddings=4096)
    with Engine(str(path), dtype="float32", max_num_seqs=1, num_kv_blocks=512) as eng:
        long = eng.open_stream("hold the slot", SamplingParams(max_new_tokens=4000, ignore_eos=True))
        first = next(iter(long))  # it runs: the only slot is taken
        queued = eng.open_stream("wait in line", GREEDY)
        assert queued.request_id != long.request_id == first.request_id
        assert eng.stats().num_waiting == 1
        queued.abort()
        deltas = list(queued)
        assert [(d.finished, d.finish_reason, d.token_ids) for d in deltas] == [(True, "abort", [])]
        assert deltas[0].output.token_ids == [] and deltas[0].request_id == queued.request_id
        stats = eng.stats()
        assert stats.num_waiting == 0 and stats.num_running == 1 and stats.finished.get("abort") == 1
        long.close()  # leaving early aborts it too
        stats = eng.stats()
        assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.finished.get("abort") == 2
        eng.check_invariants()


def test_abort_by_id_frees_blocks_and_others_keep_going(engine):
    keep = engine.add_request("Hello world", GREEDY)
    drop = engine.add_request("1 2 3", SamplingParams(max_new_tokens=50, ignore_eos=True))
    # the fixture's engine also runs a background loop (started by a stream above): a request that finishes in
    # one of its steps is collected by take_finished()
    finished = {d.request_id: d.output for d in engine.step() if d.finished}
    engine.abort(drop)
    while engine.has_unfinished():
        finished.update({d.request_id: d.output for d in engine.step() if d.finished})
    finished.update({o.request_id: o for o in engine.take_finished()})
    assert keep in finished and drop not in finished  # an aborted request's output went to its aborter
    assert finished[keep].finish_reason == "length" and len(finished[keep].token_ids) == 8
    engine.check_invariants()
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0
    assert engine.num_requests == 0  # step() users leak nothing: finished requests are dropped


def test_concurrent_streams_share_the_batch(engine):
    results: dict[int, list[int]] = {}
    expected = {i: o.token_ids for i, o in enumerate(engine.generate(["a b", "Hello", "1 2 3"], GREEDY))}

    def worker(i, prompt):
        results[i] = [t for d in engine.stream(prompt, GREEDY) for t in d.token_ids]

    threads = [threading.Thread(target=worker, args=(i, p)) for i, p in enumerate(["a b", "Hello", "1 2 3"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected
    assert max(s.batch_size for s in engine.step_history()) >= 2


def test_metrics_are_recorded(engine):
    engine.generate(["Hello world"], GREEDY)
    stats = engine.stats()
    last = stats.last_step
    assert last.duration > 0 and last.tokens_per_s > 0
    assert last.kv_blocks_total == stats.kv_blocks_total == engine.describe()["kv_cache"]["num_blocks"]
    assert last.memory.weights_bytes == engine.weights_bytes > 0
    assert last.memory.kv_cache_bytes == engine.describe()["kv_cache"]["bytes"] > 0
    assert last.memory.rss_bytes > 0


@pytest.mark.parametrize("bad", ["", None])
def test_bad_prompts_raise_and_engine_keeps_serving(engine, bad):
    with pytest.raises(RequestError):
        engine.generate([bad], GREEDY)
    assert engine.generate(["Hello"], GREEDY)[0].finish_reason == "length"


def test_prompt_longer_than_context(engine):
    with pytest.raises(RequestError, match="context"):
        engine.generate(prompt_token_ids=[[5] * 200], sampling_params=GREEDY)
    with pytest.raises(RequestError):
        engine.generate(prompt_token_ids=[[10**9]], sampling_params=GREEDY)
    assert engine.stats().num_waiting == 0 and engine.num_requests == 0
    assert engine.generate(["Hello"], GREEDY)[0].finish_reason == "length"


def test_generation_stops_at_the_context_limit(tiny_model):
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=32, block_size=8) as e:
        out = e.generate(
            prompt_token_ids=[[5] * 28], sampling_params=SamplingParams(max_new_tokens=50, ignore_eos=True)
        )
        assert out[0].finish_reason == "length" and len(out[0].token_ids) == 4


def test_unknown_path():
    with pytest.raises(ModelNotFoundError):
        Engine("/nonexistent/model/folder")


def test_gguf_is_refused(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnsupportedModelError, match="GGUF is not supported"):
        Engine(str(tmp_path / "model.gguf"))


def test_model_without_attention_backend_support_is_refused(tiny_model, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)
    with pytest.raises(UnsupportedModelError, match="_supports_attention_backend"):
        Engine(str(tiny_model("llama")), model_impl="transformers")


def test_kv_budget_too_small_for_one_sequence(tiny_model):
    with pytest.raises(KVCacheError, match="max_model_len"):
        Engine(str(tiny_model("llama")), max_model_len=256, num_kv_blocks=4, block_size=16)


@pytest.mark.parametrize(
    "opts",
    [
        dict(model_impl="fast"),
        dict(dtype="float8"),
        dict(block_size=12),
        dict(max_num_seqs=0),
        dict(nonsense=1),
        dict(device="tpu"),
    ],
)
def test_bad_engine_options(tiny_model, opts):
    with pytest.raises(EngineError):
        Engine(str(tiny_model("llama")), **opts)


@pytest.fixture
def stepped_engine(tiny_model):
    """An engine only the test steps (no background loop that another test's stream started)."""
    with Engine(str(tiny_model("llama")), dtype="float32", max_model_len=128) as e:
        yield e


def test_read_outs_show_the_snapshot_taken_between_steps(stepped_engine):
    """stats(), kv_cache_view() and num_requests read the state the loop published before the step in flight: while
    its batch is scheduled (blocks allocated, the request running) they still show it waiting with no block; a
    request added meanwhile counts as waiting; after the step, all of it shows."""
    engine = stepped_engine
    seen = {}

    def during(batch):
        # the step holds the state lock here; the read-outs must not need it (another thread could not wait on it)
        reader = threading.Thread(
            target=lambda: seen.update(stats=engine.stats(), blocks=engine.kv_cache_view(), n=engine.num_requests)
        )
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), "a read-out waited for the step's lock"
        engine.add_request(prompt_token_ids=[5, 6, 7], params=GREEDY)  # applied when the step ends
        seen["after_add"] = engine.stats().num_waiting, engine.num_requests

    first = engine.add_request(prompt_token_ids=[1, 2, 3, 4], params=GREEDY)
    engine.step(on_batch=during)
    assert seen["stats"].num_running == 0 and seen["stats"].num_waiting == 1 and seen["n"] == 1
    assert all(b.owners == [] for b in seen["blocks"]) and seen["stats"].kv_blocks_used == 0
    assert seen["after_add"] == (2, 2)
    after = engine.stats()
    assert after.num_running == 1 and after.num_waiting == 1 and engine.num_requests == 2
    assert any(first in b.owners for b in engine.kv_cache_view())
    while engine.has_unfinished():
        engine.step()
    assert engine.num_requests == 0 and engine.stats().kv_blocks_used == 0


def test_a_consumer_holding_its_final_delta_sees_its_request_gone(engine):
    """Deltas are pushed after the snapshot that matches them: once a stream ended, the read-outs no longer hold it."""
    for _ in range(5):
        for delta in engine.stream("Hello", GREEDY):
            pass
        assert delta.finished and engine.num_requests == 0
        assert engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0


def test_a_consumer_that_raises_fails_its_own_request_only(engine):
    got = []

    def broken(delta):
        got.append(delta)
        if not delta.finished:
            raise RuntimeError("consumer gone")

    handle = engine.open_stream("Hello", SamplingParams(max_new_tokens=50, ignore_eos=True), sink=broken)
    ok = engine.generate(["Hello"], GREEDY)[0]  # another request, served meanwhile
    handle.close()  # waits until the engine dropped it
    assert got[-1].finished and got[-1].finish_reason == "error" and "consumer gone" in got[-1].output.error
    assert ok.finish_reason == "length" and len(ok.token_ids) == 8
    assert engine.num_requests == 0 and engine.stats().kv_blocks_used == 0
