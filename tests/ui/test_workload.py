"""The app's Workload (each request's deltas pushed by the engine's loop, no thread per request): Stop aborts the
requests still waiting in the engine's queue before they cost a prefill or a token, not when they would have reached
their first token."""

from __future__ import annotations

import threading

from backend import Engine, SamplingParams
from tests.helpers import wait_until
from ui.workload import Workload


def test_stop_aborts_queued_requests_before_their_first_token(tiny_model):
    path = tiny_model("llama", max_position_embeddings=4096)
    with Engine(str(path), dtype="float32", max_num_seqs=1, num_kv_blocks=512) as engine:
        params = SamplingParams(max_new_tokens=4000, ignore_eos=True)
        wl = Workload(engine, ["one prompt", "two prompt", "three prompt"], params, use_chat_template=False).start()
        # every thread has queued its request, one of them runs
        wait_until(lambda: engine.stats().num_waiting == 2 and any(r.token_ids for r in wl.snapshot()[0]))
        results, _ = wl.snapshot()
        running = [r for r in results if r.token_ids]
        assert len(running) == 1 and engine.stats().num_waiting == 2  # one slot: the other two wait in line
        assert sorted(r.status for r in results) == ["running", "waiting", "waiting"]
        wl.stop()
        assert wl.wait(timeout=30)
        results, _ = wl.snapshot()
        assert [r.finish_reason for r in results] == ["abort"] * 3
        queued = [r for r in results if r.index != running[0].index]
        assert all(not r.token_ids and r.ttft is None for r in queued)  # never prefilled, no token
        stats = engine.stats()
        assert stats.finished.get("abort") == 3 and stats.kv_blocks_used == 0
        assert stats.generation_tokens == sum(len(r.token_ids) for r in results)
        engine.check_invariants()


def test_the_workload_runs_no_thread_per_request(tiny_model, monkeypatch):
    """Eight requests in flight at once, staggered or not: the engine's loop pushes their deltas (open_stream's
    sink), so the only threads besides the caller's are the engine's loop and, for staggered arrivals, one sender."""
    from backend.core.runner import ModelRunner

    run = ModelRunner.run

    def slow_run(self, batch):  # steps long enough that the check below sees every request in flight (none timed)
        threading.Event().wait(0.02)
        return run(self, batch)

    monkeypatch.setattr(ModelRunner, "run", slow_run)
    path = tiny_model("llama")
    prompts = [f"prompt number {i}" for i in range(8)]
    with Engine(str(path), dtype="float32", max_num_seqs=8, num_kv_blocks=256) as engine:
        for gap_s, extra in ((0.0, set()), (0.01, {"ui-arrivals"})):
            before = set(threading.enumerate())
            params = SamplingParams(max_new_tokens=24, ignore_eos=True)
            wl = Workload(engine, prompts, params, use_chat_template=False, gap_s=gap_s).start()
            wait_until(lambda: all(r.token_ids for r in wl.snapshot()[0]))  # all eight running
            names = {t.name for t in set(threading.enumerate()) - before}
            assert names <= {"engine-loop"} | extra, names
            assert wl.wait(timeout=60) and wl.done
            results, series = wl.snapshot()
            assert [r.finish_reason for r in results] == ["length"] * 8 and all(r.num_tokens == 24 for r in results)
            assert max(series.batch_size) == 8 and wl.wall_s > 0
            assert engine.stats().kv_blocks_used == 0


def test_a_request_refused_at_open_fails_only_its_row(tiny_model):
    path = tiny_model("llama")
    with Engine(str(path), dtype="float32", max_model_len=64, num_kv_blocks=64) as engine:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        wl = Workload(engine, ["short", "word " * 200], params, use_chat_template=False).start()
        assert wl.wait(timeout=60)
        ok, too_long = wl.snapshot()[0]
        assert ok.finish_reason == "length" and ok.num_tokens == 4
        assert too_long.status == "error" and "ContextLengthError" in too_long.error
