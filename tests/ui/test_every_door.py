"""One policy, every door: the hosted app's named endpoints (gradio_client's view_api, so a new endpoint cannot be
left out) driven with paths outside the allowed folders, as any visitor can call them without the page. Each door
that takes a model name or a query answers every such path with the same refusal, whether the path exists or not
(also through `..` and a symlink under an allowed folder), and no answer carries bytes, names or listings of what
is outside. A door that takes neither must be named in NO_PATH_INPUT, with why."""

from __future__ import annotations

import json
import shutil

import pytest

from backend.hosting import HostPolicy
from backend.hosting.paths import PATH_REFUSED
from tests.ui.conftest import free_port

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")

SECRET = b"SECRET-7"  # the first 8 bytes of the outside checkpoint: a safetensors header length when read
PATH_INPUTS = ("choice", "query")  # the inputs that name a model (or search for one)
NO_PATH_INPUT = {  # endpoints that take no model name or path, and why
    "/generate": "a prompt and sampling values; its endpoint URL is refused when hosted (ui/endpoint.py); its image "
    "is an upload (Gradio refuses a server path; tests/ui/test_image_door.py)",
    "/image_prefill": "a prompt and an uploaded image on the loaded engine (tests/ui/test_image_door.py)",
    "/stop": "no input",
    "/stop_compare": "no input",
    "/stop_benchmark": "no input",
    "/inspect": "no input: the loaded engine",
    "/trace": "a prompt on the loaded engine",
}


@pytest.fixture(scope="module")
def outside_paths(tmp_path_factory, ui_cache):
    """allowed/ (the host's folder, holding a copy of the tiny model), outside/model: a config.json and a
    safetensors file that starts with SECRET, beside a file whose name must never show; allowed/escape -> outside."""
    root = tmp_path_factory.mktemp("every-door")
    allowed, outside = root / "allowed", root / "outside"
    shutil.copytree(ui_cache, allowed / "mine")
    model = outside / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (model / "model.safetensors").write_bytes(SECRET + b"{}" + b"x" * 64)
    (model / "listing-canary.txt").write_text("never shown")
    (allowed / "escape").symlink_to(model, target_is_directory=True)
    paths = [str(model), str(outside / "missing"), f"{allowed}/../outside/model", str(allowed / "escape")]
    return dict(allowed=allowed, paths=paths)


@pytest.fixture(scope="module")
def hosted_url(outside_paths):
    """The hosted app (the Benchmark tab allowed, so its path check is what refuses) on a free loopback port."""
    import app as app_module
    from ui.callbacks import Lab
    from ui.layout import CSS, THEME

    policy = HostPolicy.hosted_defaults(allowed_dirs=(outside_paths["allowed"],), allow_benchmark=True)
    lab = Lab(update_s=0.2, policy=policy, host_model="tiny:llama")
    demo = app_module.make_demo("tiny:llama", lab=lab)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, theme=THEME, css=CSS)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    lab.session.close()


def _answer(client, api_name: str, kwargs: dict) -> str:
    """Everything the endpoint answers (its last output, or the error message), as text."""
    try:
        out = client.predict(**kwargs, api_name=api_name)
    except AppError as e:
        return f"error: {e}"
    return json.dumps(out, default=str)


def test_every_named_endpoint_refuses_outside_paths_alike(hosted_url, outside_paths):
    client = gradio_client.Client(hosted_url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    checked = []
    for api_name, info in endpoints.items():
        names = [p["parameter_name"] for p in info["parameters"]]
        door = [n for n in names if n in PATH_INPUTS]
        if not door:
            assert api_name in NO_PATH_INPUT, f"{api_name} takes {names}: add its path input to this test"
            continue
        answers = []
        for path in outside_paths["paths"]:
            answer = _answer(client, api_name, {door[0]: path})
            assert SECRET.decode() not in answer and "listing-canary" not in answer, (api_name, answer)
            assert "header of" not in answer and "config.json" not in answer, (api_name, answer)
            answers.append(answer.replace(json.dumps(path)[1:-1], "<path>").replace(path, "<path>"))
        assert len(set(answers)) == 1, (api_name, answers)  # one answer whether the path exists or not
        if door[0] == "choice":
            assert PATH_REFUSED in answers[0], (api_name, answers[0])
        checked.append(api_name)
    expected = {"/startup", "/estimate", "/load", "/compare", "/benchmark", "/search"}
    assert expected | {n for n in endpoints if n.startswith("/preset_")} <= set(checked)
    print(f"\nchecked {len(checked)} endpoints: {sorted(checked)}")
