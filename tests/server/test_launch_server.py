"""`python -m backend.launch_server` as a user types it: starts, serves, stops on SIGTERM, port released."""

from __future__ import annotations

import signal
import socket

import openai
import pytest

from tests.server.conftest import free_port, start_server_process


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds (closed connections may linger)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def test_help_documents_every_flag(capsys):
    from backend.launch_server import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--model-path", "--host", "--port", "--model-impl", "--quantization", "--dtype", "--device",
        "--trust-remote-code", "--served-model-name", "--chat-template", "--api-key", "--kv-cache-memory-gb",
        "--num-kv-blocks", "--max-model-len", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
    ):  # fmt: skip
        assert flag in out, flag
    assert "30000" in out


def test_launch_serve_sigterm(tiny_model):
    port = free_port()
    args = [
        "--model-path", str(tiny_model("llama")), "--model-impl", "transformers", "--dtype", "float32",
        "--served-model-name", "tiny", "--log-level", "warning",
    ]  # fmt: skip
    server = start_server_process(args, port, ready_timeout=120)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].model_impl == "transformers"
        r = client.completions.create(model="tiny", prompt="hello", max_tokens=4)
        assert r.usage.completion_tokens == 4
        # a stream in flight when SIGTERM arrives is ended (aborted), not waited for
        stream = client.completions.create(
            model="tiny", prompt="hello", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(timeout=60)
        server.reader.join(timeout=10)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
    out = server.output
    assert rc == 0, out
    assert "transformers implementation" in out and f"http://127.0.0.1:{port}" in out
    assert "server stopped" in out
    assert port_is_free(port)


def test_main_returns_only_once_the_engine_is_closed(tiny_model, monkeypatch):
    """SIGTERM closes the engine on a thread of its own; main() must wait for that close to end before it returns.
    Returning earlier left the engine's threads inside torch while the interpreter exited: "terminate called
    without an active exception", exit 134 (issue 26, item 8). Here the close takes a second longer than usual
    (a step still running), and main() must not return before it ended."""
    import threading
    import time

    import backend
    import backend.launch_server as launch

    closed = threading.Event()
    servers: list = []

    def slow_engine(*args, **kwargs):
        engine = backend.core.engine.Engine(*args, **kwargs)
        real_close = engine.close
        first = threading.Lock()

        def close() -> None:
            if not first.acquire(blocking=False):
                return real_close()  # the real one returns at once while the first close still runs
            real_close()
            time.sleep(1.0)  # the rest of the first close: e.g. joining a step loop still in a forward
            closed.set()

        engine.close = close
        return engine

    real_init = launch._Server.__init__

    def init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        servers.append(self)

    monkeypatch.setattr(backend, "Engine", slow_engine)
    monkeypatch.setattr(launch._Server, "__init__", init)

    def stop_when_started() -> None:
        deadline = time.monotonic() + 120
        while not (servers and servers[0].started) and time.monotonic() < deadline:
            time.sleep(0.05)
        servers[0].handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls

    stopper = threading.Thread(target=stop_when_started, daemon=True)
    stopper.start()
    argv = ["--model-path", str(tiny_model("llama")), "--dtype", "float32", "--port", str(free_port())]
    assert launch.main(argv + ["--num-kv-blocks", "16", "--log-level", "warning"]) == 0
    assert closed.is_set(), "main() returned while the engine was still closing"
    stopper.join(timeout=10)
