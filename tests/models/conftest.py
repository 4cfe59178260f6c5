import pytest

from tests.helpers import PROMPTS, hf_greedy

N_NEW = 8


@pytest.fixture(scope="session")
def hf_reference(tiny_model):
    """hf_reference(arch) -> HF generate() greedy tokens for each of PROMPTS (N_NEW each), computed once."""
    done: dict[str, list[list[int]]] = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in done:
            done[arch] = hf_greedy(tiny_model(arch), PROMPTS, N_NEW)
        return done[arch]

    return get


@pytest.fixture(scope="session")
def tiny_variant(tmp_path_factory):
    """tiny_variant(name, arch, **overrides) -> checkpoint path, built once per name (overrides may hold dicts)."""
    from backend.tools.tiny_models import build_tiny_model

    built: dict = {}

    def make(name: str, arch: str, **overrides):
        if name not in built:
            built[name] = build_tiny_model(arch, tmp_path_factory.mktemp(name), **overrides)
        return built[name]

    return make
