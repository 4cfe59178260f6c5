"""Hosted, one visitor cannot confirm another's prompt through `cached_tokens`: each owner's requests share prefix-cache
blocks only with that owner's (the owner joins the request's cache_salt), unless the host shares the cache."""

from __future__ import annotations

import pytest

from backend import Engine, SamplingParams
from backend.hosting import HostPolicy

PROMPT = list(range(3, 3 + 64))  # four full blocks of 16
ONE = SamplingParams(max_new_tokens=1, temperature=0.0)


def _cached(engine: Engine, owner: str | None, cache_salt: str | None = None) -> int:
    out = engine.generate(prompt_token_ids=[PROMPT], sampling_params=ONE, owner=owner, cache_salt=cache_salt)
    return out[0].num_cached_tokens


@pytest.fixture(scope="module")
def path(tiny_model):
    return str(tiny_model("llama"))


def test_per_owner_blocks_are_not_shared_across_owners(path):
    with Engine(path, dtype="float32", num_kv_blocks=64, prefix_cache_per_owner=True) as engine:
        assert _cached(engine, "client:10.0.0.1") == 0
        assert _cached(engine, "client:10.0.0.2") == 0  # another visitor: no hit on the first one's blocks
        assert _cached(engine, "client:10.0.0.1") >= 48  # the same visitor: its own blocks
        assert _cached(engine, "client:10.0.0.1", cache_salt="s") == 0  # its salt still separates
        assert engine.check_invariants() is None


def test_shared_cache_hits_across_owners(path):
    with Engine(path, dtype="float32", num_kv_blocks=64) as engine:
        assert _cached(engine, "client:10.0.0.1") == 0
        assert _cached(engine, "client:10.0.0.2") >= 48


def test_the_hosted_policy_isolates_unless_the_host_shares():
    assert HostPolicy.hosted_defaults().engine_options()["prefix_cache_per_owner"] is True
    shared = HostPolicy.hosted_defaults(share_prefix_cache=True).engine_options()
    assert "prefix_cache_per_owner" not in shared
    assert "prefix_cache_per_owner" not in HostPolicy().engine_options()  # not hosted: one user, one shared cache
    assert any("prefix cache: per visitor" in line for line in HostPolicy.hosted_defaults().summary())
