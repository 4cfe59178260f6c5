"""Remote code is the host's decision: a visitor's request is ignored; a model that needs it loads only when the
host allowed it (and the repository is in the host's list, when there is one). Refused before any weights."""

from __future__ import annotations

import json

import pytest

from backend.hosting import HostingError, HostPolicy, check_remote_code
from backend.hosting.remote_code import IGNORED_REQUEST, remote_code_status
from tests.hosting.fakehub import cached_weight_files, fake_hub, llama_config, safetensors_header_only, write_folder

AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
NOT_ALLOWED = (
    "needs remote code (it ships its own Python code in its repository) and the host has not allowed remote code "
    "on this host; pick another model"
)


@pytest.fixture
def folders(tmp_path):
    weights = safetensors_header_only({"lm_head.weight": ("BF16", [8, 8])})
    custom = write_folder(
        tmp_path / "custom", {"config.json": llama_config(auto_map=AUTO_MAP), "m.safetensors": weights}
    )
    plain = write_folder(tmp_path / "plain", {"config.json": llama_config(), "m.safetensors": weights})
    return custom, plain


def test_visitor_asking_for_remote_code_is_ignored(folders):
    custom, plain = folders
    host = HostPolicy.hosted_defaults(allowed_dirs=(custom.parent,))
    with pytest.raises(HostingError) as e:
        check_remote_code(str(custom), True, host)
    assert str(e.value) == f"{custom} {NOT_ALLOWED}"
    decision = check_remote_code(str(plain), True, host)
    assert not decision.trust and not decision.needs
    assert decision.message == f"{plain} runs without remote code ({IGNORED_REQUEST})"


def test_not_hosted_too_the_visitor_cannot_turn_it_on(folders):
    custom, _ = folders
    with pytest.raises(HostingError, match="the host has not allowed remote code"):
        check_remote_code(str(custom), True, HostPolicy())


def test_host_allows_remote_code(folders):
    custom, plain = folders
    host = HostPolicy.hosted_defaults(allow_remote_code=True)
    for requested in (True, False):  # the visitor's wish changes nothing
        decision = check_remote_code(str(custom), requested, host)
        assert decision.trust and decision.needs
        assert decision.message == (
            f"{custom} runs its own code from its repository: the host has allowed remote code for it"
        )
    assert not check_remote_code(str(plain), True, host).trust  # not needed: not turned on


def test_allow_list(folders, tmp_path, monkeypatch):
    custom, _ = folders
    host = HostPolicy.hosted_defaults(allow_remote_code=True, remote_code_repos=("org/trusted",))
    with pytest.raises(HostingError) as e:
        check_remote_code(str(custom), False, host)
    assert str(e.value) == (
        f"{custom} needs remote code and the host allows remote code only for org/trusted; pick one of those or "
        "another model"
    )
    listed = HostPolicy.hosted_defaults(allow_remote_code=True, remote_code_repos=(str(custom),))
    assert check_remote_code(str(custom), False, listed).trust

    weights = safetensors_header_only({"lm_head.weight": ("BF16", [8, 8])})
    repos = {
        "org/trusted": {"config.json": llama_config(auto_map=AUTO_MAP), "model.safetensors": weights},
        "Org/Other": {"config.json": llama_config(auto_map=AUTO_MAP), "model.safetensors": weights},
    }
    with fake_hub(monkeypatch, tmp_path / "cache", repos):
        assert check_remote_code("org/trusted", False, host).trust
        with pytest.raises(HostingError, match="only for org/trusted"):
            check_remote_code("Org/Other", False, host)


def test_hub_model_needing_remote_code_is_refused_from_its_config_alone(tmp_path, monkeypatch):
    big = safetensors_header_only({"lm_head.weight": ("BF16", [128256, 4096])})
    repos = {"org/custom": {"config.json": llama_config(auto_map=AUTO_MAP), "model.safetensors": big}}
    cache = tmp_path / "cache"
    with fake_hub(monkeypatch, cache, repos) as hub:
        with pytest.raises(HostingError) as e:
            check_remote_code("org/custom", True, HostPolicy.hosted_defaults())
        assert str(e.value) == f"org/custom {NOT_ALLOWED}"
        assert hub.fetched() == ["config.json"]
    assert cached_weight_files(cache) == []


def test_hub_config_from_the_cache_offline(tmp_path, monkeypatch):
    repos = {"org/custom": {"config.json": llama_config(auto_map=AUTO_MAP)}}
    cache = tmp_path / "cache"
    with fake_hub(monkeypatch, cache, repos):
        with pytest.raises(HostingError):
            check_remote_code("org/custom", False, HostPolicy.hosted_defaults())
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HostingError, match="needs remote code"):  # the Hub is gone: the cached config answers
        check_remote_code("org/custom", False, HostPolicy.hosted_defaults())


def test_auto_map_in_text_config_counts(tmp_path):
    folder = write_folder(
        tmp_path / "vlm", {"config.json": json.dumps({"text_config": {"auto_map": AUTO_MAP}}).encode()}
    )
    with pytest.raises(HostingError, match="needs remote code"):
        check_remote_code(str(folder), False, HostPolicy())


def test_builtin_models_need_no_remote_code():
    assert not check_remote_code("tiny:llama", True, HostPolicy.hosted_defaults()).trust


def test_status_line_for_the_app():
    assert remote_code_status(HostPolicy()).startswith("Remote code: not allowed by the host")
    assert "org/a" in remote_code_status(HostPolicy(allow_remote_code=True, remote_code_repos=("org/a",)))
    assert "runs on this machine" in remote_code_status(HostPolicy(allow_remote_code=True))
