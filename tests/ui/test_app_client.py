"""The app served on a free local port, driven through its API with gradio_client."""

from __future__ import annotations

import json
import time

import pytest

import app as app_module

gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")

# the Model panel's options by name (ui/panel.py: the /load, /compare and /startup keyword arguments)
PANEL = dict(model_impl="auto", quantization="as in checkpoint", dtype="float32", device="cpu", kv_cache_memory_gb=4)


def gen_args(copies=4, max_new=32, temperature=0.0):
    return ["Once upon a time", True, "copies", copies, temperature, 1.0, 0, max_new, 0, True]


@pytest.fixture(scope="module")
def client(app_url):
    c = gradio_client.Client(app_url, verbose=False)
    status, desc, kv = c.predict("tiny:llama", api_name="/load", **PANEL)
    assert "random weights" in status and "implementation" in desc
    assert kv["type"] == "plotly"
    return c


def _wait(job, timeout=60):
    t = time.perf_counter()
    while not job.done():
        assert time.perf_counter() - t < timeout, "job did not finish"
        time.sleep(0.05)
    return job.outputs()


def test_flags_and_module_level_demo():
    import gradio as gr

    assert isinstance(app_module.demo, gr.Blocks)
    args = app_module.parse_args([])
    assert args.port == 7860 and not args.share and args.model is None
    args = app_module.parse_args(["--host", "0.0.0.0", "--port", "0", "--share", "--model", "/m"])
    assert (args.host, args.port, args.share, args.model) == ("0.0.0.0", 0, True, "/m")


def test_api_endpoints(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/load", "/generate", "/stop", "/compare", "/inspect", "/search", "/estimate", "/startup"} <= names


def test_generate_streams_with_plot_updates(client, monkeypatch):
    from backend.core.runner import ModelRunner

    run = ModelRunner.run

    def slow_run(self, batch):  # a run that spans several of the page's updates, however fast the machine
        time.sleep(0.01)
        return run(self, batch)

    monkeypatch.setattr(ModelRunner, "run", slow_run)  # the app runs in this process (tests/ui/conftest.py)
    job = client.submit(*gen_args(copies=4, max_new=160), api_name="/generate")
    outputs = _wait(job)
    assert len(outputs) >= 2, "expected several streamed updates"
    first, results, status, thr, ttft, batch, mem, summary, kv = outputs[-1]
    assert "done" in status and "KV blocks in use now: 0/" in status
    assert len(results["data"]) == 4 and all(row[2] == 160 for row in results["data"])
    for fig in (thr, ttft, batch, mem):
        assert fig["type"] == "plotly" and json.loads(fig["plot"])["data"]
    names = [t["name"] for t in json.loads(thr["plot"])["data"]]
    # smoothed curves, each with its raw per-step rates one legend click away
    assert names[0] == "decode tok/s" and "prefill tok/s" in names
    assert {"decode per step (raw)", "prefill per step (raw)"} <= set(names)
    grew = [len(json.loads(o[3]["plot"])["data"][0]["x"]) for o in outputs if isinstance(o[3], dict)]
    assert grew == sorted(grew) and grew[-1] > grew[0]  # the curves grew while generating
    assert dict(map(tuple, summary["data"]))["generated tokens"] == "640"


def test_stop_a_run(client):
    job = client.submit(*gen_args(copies=4, max_new=450, temperature=0.8), api_name="/generate")
    t = time.perf_counter()
    while not job.outputs() and time.perf_counter() - t < 30:
        time.sleep(0.05)
    assert "stopping" in client.predict(api_name="/stop")
    outputs = _wait(job, timeout=30)
    _, results, status, *_ = outputs[-1]
    assert "stopped" in status and "KV blocks in use now: 0/" in status
    assert all(row[1] == "abort" and row[2] < 450 for row in results["data"])


def test_compare_two_implementations(client):
    job = client.submit(
        "tiny:llama",
        "auto",
        "as in checkpoint",
        "transformers",
        "as in checkpoint",
        "Hello world\nThe quick brown fox",
        False,
        "lines",
        1,
        16,
        True,
        api_name="/compare",
        **PANEL,
    )
    outputs = _wait(job, timeout=120)
    status, thr, ttft, mem, batch, table, agree, load_status = outputs[-1]
    assert "agree token for token" in status
    assert table["headers"][0] == "metric" and len(table["headers"]) == 3
    assert [row[2] for row in agree["data"]] == ["identical (16 tokens)"] * 2
    runs = {t["name"].split(":")[0] for t in json.loads(thr["plot"])["data"]}
    assert runs == {"A", "B"}
    # A (auto on tiny:llama: native, the panel's own settings) was the session's engine throughout: still loaded
    assert "still loaded" in load_status or "loaded again after Compare" in load_status
    desc, kv = client.predict(api_name="/inspect")
    assert "| **implementation** | native |" in desc and kv["type"] == "plotly"  # the lab's engine again, not B
