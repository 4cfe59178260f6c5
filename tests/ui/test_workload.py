"""The app's Workload (one stream consumer per prompt): Stop aborts the requests still waiting in the engine's
queue before they cost a prefill or a token, not when they would have reached their first token."""

from __future__ import annotations

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
