"""backend/remote.py against this project's own server on loopback (the stand-in for any OpenAI-compatible
engine): streamed text equals the engine's at temperature 0, token counts, metrics, clear errors."""

from __future__ import annotations

import pytest

from backend import Engine, SamplingParams
from backend.remote import EndpointError, RemoteEndpoint, parse_metrics
from backend.server import build_app
from tests.server.conftest import free_port, start_server

PROMPTS = [[1, 5, 9, 33, 70, 2], [4, 8, 15, 16, 23, 42, 99]]
PARAMS = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(tiny_model):
    engine = Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=128)
    server, thread, url = start_server(build_app(engine, served_model_name="tiny", api_key="sk-test"))
    yield engine, url
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def test_stream_and_generate_match_the_engine(served):
    engine, url = served
    want = engine.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
    endpoint = RemoteEndpoint(url + "/v1", api_key="sk-test")
    assert endpoint.models() == ["tiny"]
    deltas = list(endpoint.stream(prompt_token_ids=PROMPTS[0], params=PARAMS))
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == want[0].text == deltas[-1].output.text
    assert sum(d.extra["num_tokens"] for d in deltas) == 12 == deltas[-1].extra["total_tokens"]
    assert deltas[-1].output.ttft is not None and deltas[-1].output.latency >= deltas[-1].output.ttft
    outs = endpoint.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
    assert [o.text for o, _ in outs] == [w.text for w in want]
    assert [n for _, n in outs] == [12, 12]
    m = endpoint.metrics()
    assert m.source == "flab" and m.kv_usage is not None and m.describe()["num_running"] != "not exposed"


def test_clear_errors(served):
    _, url = served
    with pytest.raises(EndpointError, match="HTTP 401"):
        RemoteEndpoint(url, api_key="wrong").models()
    with pytest.raises(EndpointError, match="does not answer"):
        RemoteEndpoint(f"http://127.0.0.1:{free_port()}").models()
    with pytest.raises(EndpointError, match="http"):
        RemoteEndpoint("localhost:8000")


def test_parse_metrics_of_each_family():
    vllm = 'vllm:kv_cache_usage_perc{model_name="m"} 0.25\nvllm:num_requests_running{model_name="m"} 3.0\n'
    assert parse_metrics(vllm).describe() == dict(
        source="vllm", kv_usage="25.0%", num_running="3", num_waiting="not exposed"
    )
    sglang = "# HELP x\nsglang:token_usage 0.5\nsglang:num_queue_reqs 2\n"
    assert (parse_metrics(sglang).source, parse_metrics(sglang).num_waiting) == ("sglang", 2.0)
    assert parse_metrics("python_gc_objects_collected_total 1\n").describe()["kv_usage"] == "not exposed"
