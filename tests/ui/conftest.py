"""Fixtures for the UI tests: the random-weight tiny:llama (built once into the project's cache), a Lab on it, and the
app on a free port (its default model set to tiny:llama: the UI mechanics, fast)."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The Model panel's values by option name (ui/panel.py), in the controls' units: they keep the tiny model light,
# a 4 MiB KV cache (512 blocks of 16 tokens).
LOAD_ARGS = dict(
    choice="tiny:llama",
    model_impl="auto",
    quantization="as in checkpoint",
    dtype="float32",
    device="cpu",
    kv_cache_memory_gb=4,  # the panel's box: MiB
    block_size=16,
    max_num_seqs=16,
    max_model_len=0,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ui_cache():
    """The folder of tiny:llama, the UI tests' model, built once into the project's cache (backend/paths.py)."""
    from backend.loading.builtin import resolve_builtin

    return resolve_builtin(LOAD_ARGS["choice"])


@pytest.fixture
def lab(ui_cache):
    """A Lab with the default model loaded; its engine is closed afterwards."""
    from ui.callbacks import Lab

    lab = Lab(update_s=0.1)
    lab.loader.load(**LOAD_ARGS)
    yield lab
    lab.session.close()


@pytest.fixture(scope="session")
def app_url(ui_cache):
    """The app (same Blocks and queue as app.py) served on a free local port in this process."""
    import app as app_module
    from ui.callbacks import Lab
    from ui.layout import CSS, THEME, build_demo

    lab = Lab(update_s=0.2)
    demo = build_demo(lab, default_model=LOAD_ARGS["choice"]).queue(
        default_concurrency_limit=app_module.QUEUE_CONCURRENCY
    )
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    lab.session.close()
