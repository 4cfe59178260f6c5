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
    from backend.loading.tiny_models import build_tiny_model

    built: dict = {}

    def make(name: str, arch: str, **overrides):
        if name not in built:
            built[name] = build_tiny_model(arch, tmp_path_factory.mktemp(name), **overrides)
        return built[name]

    return make


ARCH_SWEEP_KEY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def arch_sweep_results(request) -> dict:
    """model_type -> SweepResult of tests/models/test_arch_sweep.py (printed at the end of the session)."""
    return request.config.stash.setdefault(ARCH_SWEEP_KEY, {})


def pytest_terminal_summary(terminalreporter, config) -> None:
    import os
    from collections import Counter
    from pathlib import Path

    results = config.stash.get(ARCH_SWEEP_KEY, None)
    if not results:
        return
    counts = Counter(r.outcome for r in results.values())
    terminalreporter.section("architecture sweep")
    terminalreporter.line(
        f"{len(results)} architectures: {counts['exact']} exact, {counts['refused']} refused, "
        f"{counts['skipped']} skipped (HF fails), {counts['mismatch']} mismatched"
    )
    for outcome in ("mismatch", "refused", "skipped"):
        for name, r in sorted(results.items()):
            if r.outcome == outcome:
                terminalreporter.line(f"  {outcome:8} {name}: {r.detail[:300]}")
    if os.environ.get("ARCH_SWEEP_REPORT"):
        from tests.models.arch_sweep import write_report

        write_report(results, Path(os.environ["ARCH_SWEEP_REPORT"]))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """tiny_vlm(family) -> path of a random-weight image-text model with its processor (backend/tools/tiny_vlms.py)."""
    from backend.tools.tiny_vlms import build_tiny_vlm

    built: dict = {}

    def make(family: str):
        if family not in built:
            built[family] = build_tiny_vlm(family, tmp_path_factory.mktemp(family))
        return built[family]

    return make
