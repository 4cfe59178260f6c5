"""A client that hangs up while its request still waits in the queue (no token yet) has it aborted at once, not
when it would have reached its first token: with one running slot taken by a long request, the queued request's
abort lands while the long one still runs. The same for the app's endpoint client (RemoteStream.abort)."""

from __future__ import annotations

import threading

import httpx
import pytest

from backend import Engine, SamplingParams
from backend.remote import RemoteEndpoint
from backend.server import build_app
from tests.helpers import wait_until
from tests.server.conftest import start_server, wait_idle

LONG = 3000  # tokens the request holding the only slot asks for: it runs for seconds


@pytest.fixture(scope="module")
def one_slot(tiny_model):
    """A server whose engine runs one sequence at a time (the next request waits in the queue)."""
    path = tiny_model("llama", max_position_embeddings=4096)
    engine = Engine(str(path), dtype="float32", num_kv_blocks=512, max_num_seqs=1)
    server, thread, url = start_server(build_app(engine, served_model_name="tiny"))
    yield engine, url
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def _start_long(client: httpx.Client, engine: Engine):
    """The long request, streaming (its body left unread): the open response, once it holds the slot."""
    body = {"prompt": "hold the slot", "max_tokens": LONG, "stream": True, "ignore_eos": True}
    response = client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
    assert response.status_code == 200
    assert wait_until(lambda: engine.stats().num_running == 1 and engine.stats().generation_tokens > 0)
    return response


@pytest.mark.parametrize("stream", [True, False])
def test_queued_request_of_a_gone_client_is_aborted_before_its_first_token(one_slot, stream):
    engine, url = one_slot
    with httpx.Client(base_url=url, timeout=60) as client:
        aborts = engine.stats().finished.get("abort", 0)
        long = _start_long(client, engine)
        try:
            body = {"prompt": "queued", "max_tokens": 8, "stream": stream}
            if stream:  # the headers come at once; hang up before any token
                with client.stream("POST", "/v1/completions", json=body) as queued:
                    assert queued.status_code == 200
                    assert wait_until(lambda: engine.stats().num_waiting == 1)
            else:  # the client gives up waiting for the whole answer
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/v1/completions", json=body, timeout=0.5)
            assert wait_until(lambda: engine.stats().finished.get("abort", 0) == aborts + 1), "the abort never landed"
            stats = engine.stats()
            assert stats.num_waiting == 0
            assert stats.num_running == 1, "the abort waited for the long request to end"
        finally:
            long.close()  # hang up on the long one too: aborted, every block freed
    wait_idle(engine)
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    assert stats.finished.get("abort", 0) == aborts + 2
    engine.check_invariants()


def test_a_remote_stream_aborted_before_its_first_token_ends_at_once(one_slot):
    """RemoteEndpoint.open_stream (the app's endpoint runs): abort() from another thread shuts the connection down
    while the reading thread still waits for the first chunk; the server aborts the queued request."""
    engine, url = one_slot
    endpoint = RemoteEndpoint(url + "/v1")
    with httpx.Client(base_url=url, timeout=60) as client:
        aborts = engine.stats().finished.get("abort", 0)
        long = _start_long(client, engine)
        try:
            handle = endpoint.open_stream(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=8))
            deltas: list = []
            reader = threading.Thread(target=lambda: deltas.extend(handle), daemon=True)
            reader.start()
            assert wait_until(lambda: engine.stats().num_waiting == 1)  # sent, queued, no chunk yet
            handle.abort()
            reader.join(timeout=30)
            assert not reader.is_alive(), "the read did not end"
            assert [(d.finished, d.finish_reason, d.text) for d in deltas] == [(True, "abort", "")]
            assert wait_until(lambda: engine.stats().finished.get("abort", 0) == aborts + 1)
            assert engine.stats().num_running == 1 and engine.stats().num_waiting == 0  # the long one still runs
        finally:
            long.close()
    wait_idle(engine)
    assert engine.stats().kv_blocks_used == 0


def test_the_apps_endpoint_run_stops_its_queued_requests_at_once(one_slot):
    """The app's endpoint workload (ui/endpoint.py) on Stop: its requests still queued at the endpoint (the only
    slot is another client's) are aborted now, not when they would have reached their first token."""
    from ui.endpoint import EndpointWorkload

    engine, url = one_slot
    with httpx.Client(base_url=url, timeout=60) as client:
        aborts = engine.stats().finished.get("abort", 0)
        long = _start_long(client, engine)
        try:
            params = SamplingParams(max_new_tokens=8)
            wl = EndpointWorkload(RemoteEndpoint(url + "/v1"), ["a", "b"], params, sample_metrics=False).start()
            assert wait_until(lambda: engine.stats().num_waiting == 2)
            wl.stop()
            assert wl.wait(timeout=30), "the run did not stop"
            assert [r.finish_reason for r in wl.snapshot()[0]] == ["abort", "abort"]
            assert wait_until(lambda: engine.stats().finished.get("abort", 0) == aborts + 2)
            assert engine.stats().num_running == 1, "the aborts waited for the other client's request to end"
        finally:
            long.close()
    wait_idle(engine)
    assert engine.stats().kv_blocks_used == 0
