"""/health tells the truth (issue 26, item 6): 503 once the engine cannot serve (closed, its tensor-parallel group
down), requests then get a 503 too; `launch_server` exits non-zero when the group cannot recover, so a supervisor
restarts it."""

from __future__ import annotations

import os
import signal

import httpx
import psutil

from backend import Engine
from backend.server import build_app
from tests.helpers import wait_until
from tests.server.conftest import free_port, start_server, start_server_process

GUARD_S = 120  # bounds a hang; not a speed requirement


def test_health_is_503_once_the_engine_is_closed(tiny_model):
    engine = Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=64)
    server, thread, url = start_server(build_app(engine, served_model_name="tiny"))
    try:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        engine.close()
        r = httpx.get(f"{url}/health", timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error", r.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


def test_health_is_503_when_a_tensor_parallel_worker_died(tiny_model):
    engine = Engine(
        str(tiny_model("llama")), model_impl="native", dtype="float32", device="cpu", num_kv_blocks=64, tp_size=2
    )
    server, thread, url = start_server(build_app(engine, served_model_name="tiny"))
    try:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        (pid,) = engine.tp_group.worker_pids
        os.kill(pid, signal.SIGKILL)  # between requests: no step has seen it yet
        assert wait_until(lambda: httpx.get(f"{url}/health", timeout=30).status_code == 503, GUARD_S)
        error = httpx.get(f"{url}/health", timeout=30).json()["error"]
        assert error["code"] == "engine_unavailable" and "rank 1 died" in error["message"], error
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and "tensor-parallel group is down" in r.json()["error"]["message"], r.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()


def _tp_worker(pid: int) -> psutil.Process:
    """The server's tensor-parallel worker: its child started by multiprocessing's spawn (not the resource
    tracker)."""
    workers = [
        p
        for p in psutil.Process(pid).children()
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert len(workers) == 1, [p.cmdline() for p in psutil.Process(pid).children()]
    return workers[0]


def test_launch_server_exits_non_zero_when_the_tensor_parallel_group_is_down(tiny_model):
    port = free_port()
    args = [
        "--model-path", str(tiny_model("llama")), "--model-impl", "native", "--dtype", "float32", "--device", "cpu",
        "--num-kv-blocks", "64", "--tp-size", "2", "--served-model-name", "tiny", "--log-level", "warning",
    ]  # fmt: skip
    server = start_server_process(args, port, ready_timeout=GUARD_S)
    try:
        _tp_worker(server.proc.pid).kill()
        rc = server.proc.wait(timeout=GUARD_S)
        server.reader.join(timeout=10)
    finally:
        server.stop()
    out = server.output
    assert rc == 3, out
    assert "rank 1 died" in out and "cannot recover" in out, out
