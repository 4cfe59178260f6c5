"""`python app.py --api`: the API's routes beside the Gradio UI on one port, over the engine the UI loaded."""

from __future__ import annotations

import httpx
import openai

from tests.server.conftest import start_server


def test_api_beside_the_ui(tiny_model):
    from app import make_api_app
    from ui.session import LoadSpec

    app, lab = make_api_app(served_model_name="ui-model")
    server, thread, url = start_server(app)
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").status_code == 503  # no engine loaded yet
            assert http.post("/v1/completions", json={"prompt": "x"}).json()["error"]["code"] == "model_not_loaded"
            engine, _ = lab.session.load(LoadSpec.make(str(tiny_model("llama")), dtype="float32", num_kv_blocks=64))
            assert http.get("/health").status_code == 200
            assert "<html" in http.get("/").text.lower()  # the UI, same port
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            r = client.completions.create(model="ui-model", prompt="hello", max_tokens=3)
            assert r.usage.completion_tokens == 3
            assert "flab:generation_tokens_total" in http.get("/metrics").text
            assert engine is lab.session.current()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        lab.session.close()
