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

import gradio as gr
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


def test_a_page_opened_during_the_start_up_load_shows_its_progress(ui_cache):
    """One progress line in the main area (the load status) while the start-up load runs, the panel's note saying
    what it waits for, every other output left alone (no spinner on each control); then the loaded engine."""
    release = threading.Event()

    def slow_factory(model, progress=None, **kwargs):
        from backend import Engine

        progress(SimpleNamespace(stage="download", bytes_done=512, bytes_total=1024, file="model.safetensors"))
        assert release.wait(60)
        return Engine(model, progress=progress, **kwargs)

    lab = Lab(Session(slow_factory), update_s=0.1, host_model="tiny:llama")
    try:
        load = lab.page.start_preload()
        updates = lab.page.startup(lab.host_panel().choice, **lab.host_panel().options)
        note, _, line, *rest = next(updates)
        while "downloading model.safetensors" not in line:
            note, _, line, *rest = next(updates)
        assert lab.session.current() is None and not load.done.is_set()  # still loading: the page waits, showing it
        assert line.startswith("⏳ **Starting** tiny:llama: downloading model.safetensors") and "50%" in line
        assert "Waiting for the host's model (tiny:llama) to load" in note
        assert all(isinstance(v, type(gr.skip())) for v in rest)  # the panel's controls untouched meanwhile
        release.set()
        *_, last = updates
        assert load.done.is_set() and load.error is None
        assert "random weights" in last[2], last[2]  # then the loaded engine's status
        assert lab.host_spec == lab.session.spec  # the start-up load set the host's settings
    finally:
        release.set()
        lab.session.close()


HOLD_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_page_says_it_waits_for_another_process_converting(tmp_path, monkeypatch):
    """Another process holds the built-in model's cache lock (as a second `python app.py` converting the GGUF
    would): the page's one line says it waits for it; when that process lets go, the model builds and loads."""
    from backend import paths
    from backend.loading.builtin import builtin_path

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path))
    target = builtin_path("tiny:llama")
    target.parent.mkdir(parents=True)
    lock = target.parent / f".{target.name}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    lab = Lab(update_s=0.1, host_model="tiny:llama")
    try:
        assert holder.stdout.readline().strip() == "held"
        updates = lab.page.startup(
            lab.host_panel().choice, **lab.host_panel().options
        )  # no engine: the page starts the host's load itself
        lines = []
        for note, _, line, *_ in updates:
            lines.append(line)
            if "waiting for another process to finish converting" in line:
                break
        assert "waiting for another process to finish converting" in lines[-1], lines
        assert lines[-1].startswith("⏳ **Starting** tiny:llama: first use:")
        assert "Waiting for the host's model (tiny:llama)" in note
        assert lab.session.current() is None and not lab.startup_load.done.is_set()
        holder.stdin.close()  # the other process lets go: this one builds the model and loads it
        *_, last = updates
        assert "random weights" in last[2], last[2]
        assert (target / "config.json").is_file()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)
        lab.session.close()
