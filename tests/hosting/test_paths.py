"""Hosted: Hub ids and built-in names load; local folders only from under the allowed dirs, and every other path
gets one message whether it exists or not (through `..`, through a symlink, absolute, relative, ~)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from backend.core.errors import ModelNotFoundError
from backend.hosting import HostingError, HostPolicy, check_model_name, is_hub_id
from backend.hosting.paths import PATH_REFUSED

VISITOR_SEES = "local folders are not allowed on this host; pick a Hub id or a folder under the host's model folders"


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """allowed/ holds a model folder; outside/ holds a secret folder; allowed/escape is a symlink to outside/."""
    allowed = tmp_path / "allowed"
    model = allowed / "models--org--m" / "snapshots" / "abc"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    outside = tmp_path / "outside"
    secret = outside / "secret"
    secret.mkdir(parents=True)
    (secret / "config.json").write_text("{}")
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    policy = HostPolicy.hosted_defaults(allowed_dirs=(allowed,))
    return policy, allowed, model, outside, secret


def test_visitor_message_is_the_documented_one():
    assert PATH_REFUSED == VISITOR_SEES


@pytest.mark.parametrize(
    "name", ["gpt2", "Qwen/Qwen3-0.6B", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/model.v2", "a-b_c/d.e-f"]
)
def test_hub_ids_pass(layout, name):
    assert is_hub_id(name)
    assert check_model_name(name, layout[0]) == name


@pytest.mark.parametrize(
    "name", ["/etc", "./x", "../x", "~/x", ".hidden", "a/b/c", "a\\b", "C:\\models", "org/--bad", "x" * 97, ""]
)
def test_paths_are_not_hub_ids(name):
    assert not is_hub_id(name)


def test_builtin_names_pass(layout):
    policy = layout[0]
    assert check_model_name("tiny:llama", policy) == "tiny:llama"
    assert check_model_name("smollm2-135m-instruct", policy) == "smollm2-135m-instruct"
    with pytest.raises(ModelNotFoundError, match="built-in models:"):
        check_model_name("tiny:nope", policy)


def test_folder_under_an_allowed_dir_passes_as_its_resolved_path(layout):
    policy, allowed, model, *_ = layout
    assert check_model_name(str(model), policy) == str(model.resolve())
    relative = os.path.relpath(model)  # relative to the working folder (tmp_path)
    assert check_model_name(relative, policy) == str(model.resolve())
    # `..` that stays inside is fine
    assert check_model_name(str(allowed / "models--org--m" / "snapshots" / ".." / "snapshots" / "abc"), policy) == str(
        model.resolve()
    )


def refused(name: str, policy: HostPolicy) -> str:
    with pytest.raises(HostingError) as e:
        check_model_name(name, policy)
    return str(e.value)


def test_every_outside_path_gets_the_same_message(layout):
    policy, allowed, _model, outside, secret = layout
    names = {
        "existing absolute": str(secret),
        "missing absolute": str(outside / "nothing-here"),
        "existing through ..": str(allowed / ".." / "outside" / "secret"),
        "missing through ..": str(allowed / ".." / "outside" / "nothing-here"),
        "existing through a symlink": str(allowed / "escape" / "secret"),
        "missing through a symlink": str(allowed / "escape" / "nothing-here"),
        "the symlink itself": str(allowed / "escape"),
        "a file": str(secret / "config.json"),
        "relative existing": "outside/secret/",
        "relative missing": "./outside/none",
        "system folder": "/etc",
        "home": "~",
        "home missing": "~/no-such-folder-here",
        "the parent of an allowed dir": str(allowed.parent),
    }
    messages = {what: refused(name, policy) for what, name in names.items()}
    assert set(messages.values()) == {VISITOR_SEES}, messages


def test_hub_id_spelling_of_an_existing_outside_folder_stays_a_hub_id(layout, tiny_model, monkeypatch, tmp_path):
    """A Hub-id spelling is a Hub id when hosted, even where a folder of that spelling exists: the engine is told
    never to read it as a folder, so a visitor learns nothing about the host's files."""
    from backend import Engine
    from backend.core.errors import ModelNotFoundError
    from backend.hosting import hosted_load_options

    policy = layout[0]
    assert check_model_name("outside/secret", policy) == "outside/secret"
    # a real, loadable checkpoint folder spelled like a Hub id, relative to the working folder
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").symlink_to(tiny_model("llama"), target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    options = hosted_load_options("org/model", policy)
    assert options == dict(model="org/model", allow_local_paths=False)
    with pytest.raises(ModelNotFoundError) as exists:
        Engine(**options)
    with pytest.raises(ModelNotFoundError) as missing:
        Engine(**hosted_load_options("org/absent", policy))
    assert str(exists.value).replace("org/model", "X") == str(missing.value).replace("org/absent", "X")


def test_symlinked_allowed_dir_is_resolved_too(tmp_path, monkeypatch):
    real = tmp_path / "real"
    (real / "m").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    policy = HostPolicy.hosted_defaults(allowed_dirs=(link,))
    assert check_model_name(str(link / "m"), policy) == str((real / "m").resolve())
    assert check_model_name(str(real / "m"), policy) == str((real / "m").resolve())
    assert refused(str(tmp_path), policy) == VISITOR_SEES


def test_symlink_loop_is_refused_like_any_path(tmp_path, monkeypatch):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    monkeypatch.chdir(tmp_path)
    assert refused(str(loop / "x"), HostPolicy.hosted_defaults(allowed_dirs=(tmp_path / "allowed",))) == VISITOR_SEES


def test_not_hosted_any_path_is_left_to_the_loader(tmp_path):
    policy = HostPolicy()
    assert check_model_name("/etc", policy) == "/etc"
    assert check_model_name(f" {tmp_path} ", policy) == str(tmp_path)


def test_no_allowed_dirs_means_no_local_folders(tmp_path):
    (tmp_path / "m").mkdir()
    assert refused(str(tmp_path / "m"), HostPolicy.hosted_defaults(allowed_dirs=())) == VISITOR_SEES
    assert check_model_name("org/m", HostPolicy.hosted_defaults(allowed_dirs=())) == "org/m"


def test_default_dirs_allow_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("FLAB_CACHE_DIR", str(tmp_path / "flab"))
    snap = tmp_path / "hub" / "models--o--m" / "snapshots" / "c"
    snap.mkdir(parents=True)
    built = tmp_path / "flab" / "models" / "tiny-llama"
    built.mkdir(parents=True)
    policy = HostPolicy.hosted_defaults()
    assert check_model_name(str(snap), policy) == str(snap.resolve())
    assert check_model_name(str(built), policy) == str(built.resolve())
    assert refused(str(Path(tmp_path)), policy) == VISITOR_SEES
