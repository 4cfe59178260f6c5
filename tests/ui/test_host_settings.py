"""When hosted, the host's engine keeps the host's settings: a visitor's load of the host's model with other engine
settings (batch, context, KV budget, step budget) is a model of their own (it takes a visitor model slot), or is
refused with the reason when no slot is free; the shared engine is unchanged then. Driven through gradio_client, as
a visitor calling /load directly would."""

from __future__ import annotations

import pytest

from backend.hosting import HostPolicy
from tests.ui.conftest import free_port

gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")

HOST = dict(  # lab.host_panel(): the panel's options by name (ui/panel.py)
    model_impl="auto", quantization="as in checkpoint", dtype="auto", device="auto", trust_remote_code=False,
    block_size=16, kv_cache_memory_gb=4, max_model_len=0, max_num_seqs=16, max_num_batched_tokens=2048,
    cpu_kernels="auto",
)  # fmt: skip
REFUSED = "the host's model runs with the host's engine settings (batch, context, KV budget, step budget)"


def hosted_app(max_visitor_models: int):
    import app as app_module
    from ui.callbacks import Lab
    from ui.layout import CSS, THEME

    policy = HostPolicy.hosted_defaults(allowed_dirs=(), max_visitor_models=max_visitor_models)
    lab = Lab(update_s=0.2, policy=policy, host_model="tiny:llama")
    demo = app_module.make_demo("tiny:llama", lab=lab)
    load = lab.page.start_preload()
    assert load.done.wait(120) and load.error is None, load.error
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS)
    return demo, lab, f"http://127.0.0.1:{port}/"


def _load(client, **changes) -> str:
    return client.predict("tiny:llama", api_name="/load", **dict(HOST, **changes))[0]


def test_other_settings_take_a_slot_and_the_host_settings_come_back(ui_cache):
    demo, lab, url = hosted_app(max_visitor_models=1)
    try:
        assert lab.host_spec == lab.session.spec and lab.host_spec.engine_kwargs()["max_num_seqs"] == 16
        a, b = (gradio_client.Client(url, verbose=False) for _ in range(2))
        status = _load(a, max_num_seqs=1, max_model_len=24)  # the attack: accepted only as a's own model
        assert "Load failed" not in status, status
        assert lab.model_holder == a.session_hash and lab.model_slots.holders() == 1
        status = _load(b, kv_cache_memory_gb=8)  # b wants other settings too: the one slot is a's
        assert "Load failed" in status and REFUSED in status and "all are in use" in status, status
        assert dict(lab.session.spec.options)["max_num_seqs"] == 1  # a's model, unchanged by b
        assert "Load failed" not in _load(a)  # the host's settings again: the slot is free
        assert lab.session.spec == lab.host_spec and lab.model_slots.holders() == 0 and lab.model_holder is None
    finally:
        demo.close()
        lab.session.close()


def test_other_settings_are_refused_when_visitors_have_no_slots(ui_cache):
    demo, lab, url = hosted_app(max_visitor_models=0)
    try:
        client = gradio_client.Client(url, verbose=False)
        for change in (
            dict(max_num_seqs=1),
            dict(max_model_len=24),
            dict(kv_cache_memory_gb=3000),
            dict(block_size=32),
        ):
            status = _load(client, **change)
            assert REFUSED in status and "does not let visitors load their own model" in status, (change, status)
            assert lab.session.spec == lab.host_spec
        assert "Load failed" not in _load(client)  # the host's own settings: no slot needed
        assert lab.session.spec == lab.host_spec
    finally:
        demo.close()
        lab.session.close()
