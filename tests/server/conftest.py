"""A live server on a free loopback port over a tiny random-weight model (one per test module); and
`python -m backend.launch_server` as a subprocess (`start_server_process`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from backend import Engine
from backend.server import build_app

SERVED = "tiny-llama"
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|eos|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    engine: Engine
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(app, port: int | None = None, **options) -> tuple[uvicorn.Server, threading.Thread, str]:
    """`app` served by uvicorn in a thread on a free loopback port; `options`: more uvicorn.Config arguments."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", proxy_headers=False, **options
    )  # like the launchers: the policy's trusted proxies decide the client address
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(tiny_model):
    """The tiny llama served as SERVED (its tokenizer has a chat template), no API key."""
    engine = Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=256, max_num_seqs=64)
    server, thread, url = start_server(build_app(engine, served_model_name=SERVED))
    live = LiveServer(engine, url, server, thread)
    yield live
    live.stop()
    engine.close()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        yield client


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Until the engine holds no request and no KV block (aborts land between steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if engine.num_requests == 0 and s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0:
            return
        time.sleep(0.05)
    s = engine.stats()
    raise AssertionError(f"engine not idle: {engine.num_requests} requests, {s.kv_blocks_used} blocks used")


ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    """`python -m backend.launch_server` running as a subprocess, its output collected line by line."""

    proc: subprocess.Popen
    lines: list[str]
    reader: threading.Thread

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within a minute."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server_process(args: list[str], port: int, ready_timeout: float) -> ServerProcess:
    """`python -m backend.launch_server ARGS --host 127.0.0.1 --port PORT` from the repository root, offline; returns
    once /health answers 200. Fails with the server's output if it exits first or does not answer in time."""
    cmd = [sys.executable, "-m", "backend.launch_server", *args, "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = ServerProcess(proc, [], threading.Thread(target=lambda: server.lines.extend(proc.stdout), daemon=True))
    server.reader.start()
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            assert proc.poll() is None, server.output
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, server.output
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
