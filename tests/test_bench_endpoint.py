"""`python -m backend.tools.bench --endpoint URL` against this project's own server on loopback (the stand-in
for any OpenAI-compatible engine), and a URL that does not answer."""

from __future__ import annotations

import pytest

from backend import Engine
from backend.remote import EndpointError
from backend.server import build_app
from backend.tools import bench
from backend.tools.bench_endpoint import run_endpoint
from tests.server.conftest import free_port, start_server


@pytest.fixture(scope="module")
def served(tiny_model):
    path = str(tiny_model("llama"))
    engine = Engine(path, dtype="float32", num_kv_blocks=256, max_num_seqs=16)
    server, thread, url = start_server(build_app(engine, served_model_name="tiny"))
    yield path, url
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def test_bench_cli_runs_the_endpoint_system(served, tmp_path):
    path, url = served
    results = bench.main(
        ["--model", path, "--dtype", "float32", "--systems", "flab-native", "--workloads", "latency", "throughput",
         "--num-requests", "3", "--endpoint", url + "/v1", "--json", str(tmp_path / "bench.json")]
    )  # fmt: skip
    ours = {r.workload: r for r in results if r.system == "flab-native"}
    remote = {r.workload: r for r in results if r.system == "endpoint"}
    assert set(remote) == {"latency", "throughput"} and all(r.error is None for r in remote.values())
    for name, r in remote.items():
        assert r.output_tokens == ours[name].output_tokens > 0  # every request produced its output length
        assert r.input_tokens == ours[name].input_tokens
    assert remote["latency"].ttft_ms is not None and remote["latency"].decode_tok_s > 0


def test_endpoint_that_does_not_answer_is_a_clear_error():
    wl = bench.Workload("latency", [[1, 2, 3]], [4])
    opts = bench.BenchOptions(dtype="float32", endpoint=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(EndpointError, match="does not answer"):
        run_endpoint("unused", wl, opts)
