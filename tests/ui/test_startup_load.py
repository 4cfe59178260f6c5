"""The app loads the host's model at start-up, not on the first page view: `python app.py --api` serves the API
without any page visit, and a page opened during that load shows its progress (then the loaded engine)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

from tests.ui.conftest import free_port
from ui.callbacks import Lab
from ui.session import Session

ROOT = Path(__file__).resolve().parents[2]
SERVE_BOUND_S = 120  # generous: the start-up load of tiny:llama takes a few seconds on 2 shared cores


def test_app_api_serves_without_a_page_visit(ui_cache):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, "app.py", "--api", "--model", "tiny:llama", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + SERVE_BOUND_S
        health = None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    health = http.get("/health").status_code
                except httpx.TransportError:
                    health = None
                if health == 200:
                    break
                time.sleep(0.25)
            assert health == 200, (
                f"no 200 from /health within {SERVE_BOUND_S} s (last: {health}); nobody opened the page"
            )
            body = {"model": "tiny:llama", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Recorder:
    """gr.Progress's call signature: records each description."""

    def __init__(self) -> None:
        self.descs: list[str] = []

    def __call__(self, value, desc=None) -> None:
        self.descs.append(desc or "")


def test_a_page_opened_during_the_start_up_load_shows_its_progress(ui_cache):
    release = threading.Event()

    def slow_factory(model, progress=None, **kwargs):
        from backend import Engine

        progress(SimpleNamespace(stage="download", bytes_done=512, bytes_total=1024, file="model.safetensors"))
        assert release.wait(60)
        return Engine(model, progress=progress, **kwargs)

    lab = Lab(Session(slow_factory), update_s=0.1, host_model="tiny:llama")
    try:
        load = lab.page.start_preload()
        recorder, out = Recorder(), {}
        page = threading.Thread(target=lambda: out.update(v=lab.page.startup(*lab.host_panel().values(),
                                                                              progress=recorder)))  # fmt: skip
        page.start()
        deadline = time.monotonic() + 30
        while not any("downloading model.safetensors" in d for d in recorder.descs):
            assert time.monotonic() < deadline and page.is_alive(), recorder.descs
            time.sleep(0.05)
        assert lab.session.current() is None and not load.done.is_set()  # still loading: the page waits, showing it
        assert "loading the host's model at start-up: downloading model.safetensors" in recorder.descs[-1]
        release.set()
        page.join(timeout=60)
        assert load.done.is_set() and load.error is None
        status = out["v"][2]
        assert "random weights" in status, status  # then the loaded engine's status
        assert lab.host_spec == lab.session.spec  # the start-up load set the host's settings
    finally:
        release.set()
        lab.session.close()
