"""The hosted rule, the flags and environment variables, and their precedence (backend/hosting/policy.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from backend.hosting import HostingError, HostPolicy, add_hosting_flags, is_loopback
from backend.hosting.policy import HostedDefaults


def parser(own_api_key: bool = True, trust_flag: bool = False) -> argparse.ArgumentParser:
    """A parser shaped like app.py's / launch_server's: its own --host and --api-key, then the hosting flags."""
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    if own_api_key:
        p.add_argument("--api-key", default=None)
    if trust_flag:
        p.add_argument("--trust-remote-code", action="store_true")
    return add_hosting_flags(p)


def policy(argv: list[str], env: dict[str, str] | None = None, **kw) -> HostPolicy:
    return HostPolicy.from_env_and_flags(parser(**kw).parse_args(argv), env or {})


@pytest.mark.parametrize(
    "host, loopback",
    [
        (None, True),
        ("", True),
        ("127.0.0.1", True),
        ("127.5.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("workshop.example.org", False),
    ],
)
def test_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_hosted_rule():
    assert not policy([]).hosted
    assert policy(["--host", "0.0.0.0"]).hosted
    assert policy([], {"SPACE_ID": "someone/fallback-lab"}).hosted
    assert policy(["--hosted"]).hosted
    assert policy([], {"FLAB_HOSTED": "1"}).hosted
    # no --host flag (args without one): Gradio's variable is the app's address
    assert HostPolicy.from_env_and_flags(None, {"GRADIO_SERVER_NAME": "0.0.0.0"}).hosted
    assert not policy(["--host", "0.0.0.0", "--not-hosted"]).hosted
    assert not policy(["--host", "0.0.0.0"], {"FLAB_HOSTED": "0"}).hosted
    assert policy(["--hosted"], {"FLAB_HOSTED": "0"}).hosted  # the flag wins


def test_hosted_defaults_are_safe_and_local_has_no_caps():
    d = HostedDefaults()
    hosted = policy(["--host", "0.0.0.0"])
    assert (hosted.max_new_tokens, hosted.max_prompt_tokens, hosted.max_parallel_per_visitor) == (
        d.max_new_tokens,
        d.max_prompt_tokens,
        d.max_parallel_per_visitor,
    )
    assert (hosted.queue_size, hosted.max_visitor_models, hosted.max_body_bytes) == (
        d.queue_size,
        d.max_visitor_models,
        d.max_body_bytes,
    )
    assert not hosted.allow_remote_code and not hosted.allow_benchmark and hosted.check_memory
    assert not hosted.health_public and not hosted.metrics_public
    assert len(hosted.allowed_dirs) == 2
    local = policy([])
    assert local.max_new_tokens is None and local.max_parallel_per_visitor is None and local.allow_benchmark
    assert not local.allow_remote_code and local.check_memory and local.health_public


def test_default_dirs_are_the_hub_cache_and_the_project_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("FLAB_CACHE_DIR", str(tmp_path / "flab"))
    assert policy(["--hosted"]).allowed_dirs == (tmp_path / "hub", tmp_path / "flab")


def test_flags_and_environment(tmp_path):
    env = {
        "FLAB_MAX_NEW_TOKENS": "64",
        "FLAB_MAX_PROMPT_TOKENS": "none",
        "FLAB_ALLOW_REMOTE_CODE": "yes",
        "FLAB_REMOTE_CODE_REPOS": "org/a, org/b",
        "FLAB_ALLOWED_DIRS": f"{tmp_path / 'a'}:{tmp_path / 'b'}",
        "FLAB_API_KEY": "from-env",
        "FLAB_METRICS_PUBLIC": "1",
        "FLAB_MAX_VISITOR_MODELS": "0",
    }
    p = policy(["--hosted", "--max-new-tokens", "128", "--allow-benchmark"], env)
    assert p.max_new_tokens == 128  # flag over env
    assert p.max_prompt_tokens is None
    assert p.allow_remote_code and p.remote_code_repos == ("org/a", "org/b")
    assert p.allowed_dirs == (tmp_path / "a", tmp_path / "b")  # replaces the defaults
    assert p.api_key == "from-env" and p.metrics_public and not p.health_public
    assert p.max_visitor_models == 0 and p.allow_benchmark
    assert policy(["--api-key", "flag"], {"FLAB_API_KEY": "env"}).api_key == "flag"
    assert "from-env" not in repr(p) and all("from-env" not in line for line in p.summary())


def test_parser_without_its_own_api_key_gets_one():
    p = HostPolicy.from_env_and_flags(parser(own_api_key=False).parse_args(["--api-key", "k"]), {})
    assert p.api_key == "k"


def test_launch_servers_trust_remote_code_flag_is_the_hosts_permission():
    assert policy(["--trust-remote-code"], trust_flag=True).allow_remote_code
    assert not policy([], trust_flag=True).allow_remote_code


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--max-new-tokens", "lots"], {}, "--max-new-tokens / FLAB_MAX_NEW_TOKENS: 'lots' is not a whole number"),
        ([], {"FLAB_HOSTED": "maybe"}, "FLAB_HOSTED='maybe': use 1/true/yes/on or 0/false/no/off"),
        (["--queue-size", "0"], {}, "queue_size must be at least 1 (or None: no cap)"),
    ],
)
def test_bad_values_name_the_flag(argv, env, message):
    with pytest.raises(HostingError) as e:
        policy(argv, env)
    assert str(e.value).startswith(message)


def test_hosted_without_key_warns():
    assert any("without an API key" in line for line in policy(["--hosted"]).summary())
    assert not any("without an API key" in line for line in policy(["--hosted", "--api-key", "k"]).summary())


def test_policy_is_frozen():
    p = HostPolicy()
    with pytest.raises(AttributeError):
        p.hosted = True  # type: ignore[misc]
    assert HostPolicy(api_key="  ").api_key is None
    assert isinstance(HostPolicy.hosted_defaults().allowed_dirs[0], Path)


def test_engine_options_carry_the_per_visitor_cap():
    from backend.core.config import EngineConfig

    options = HostPolicy.hosted_defaults(max_parallel_per_visitor=3).engine_options()
    assert options == {"max_running_per_owner": 3, "prefix_cache_per_owner": True}
    assert EngineConfig(model="tiny:llama", **options).max_running_per_owner == 3
    assert HostPolicy().engine_options() == {}
