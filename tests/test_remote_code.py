"""Remote-code models (examples/remote_code_model): run when they keep the two rules, refused otherwise."""

import subprocess
import sys
from pathlib import Path

import pytest

from backend import Engine, SamplingParams
from backend.core.errors import UnsupportedModelError
from examples.remote_code_model.build import BREAKAGES, build
from tests.helpers import PROMPTS, hf_greedy

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def flab(tmp_path_factory):
    return build(tmp_path_factory.mktemp("flab"))


def test_remote_code_model_matches_hf_generate(flab):
    expected = hf_greedy(flab, PROMPTS, 8, trust_remote_code=True)
    with Engine(str(flab), trust_remote_code=True, dtype="float32") as engine:
        assert engine.model_impl == "transformers"
        outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == expected


def test_remote_code_needs_trust(flab):
    with pytest.raises(UnsupportedModelError, match="trust_remote_code=True"):
        Engine(str(flab))


def test_twin_without_attention_backend_is_refused(tmp_path):
    path = build(tmp_path / "flab", broken="no-attention-backend")
    assert "_supports_attention_backend = True\n" not in (path / "modeling_flab.py").read_text()
    with pytest.raises(UnsupportedModelError, match="does not set `_supports_attention_backend = True`"):
        Engine(str(path), trust_remote_code=True)


def test_twin_without_kwargs_is_refused(tmp_path, flab):
    path = build(tmp_path / "flab", broken="no-kwargs")
    # The twin is a working model for transformers itself (same weights, same tokens): only the engine's
    # contract is broken, and the load-time probe finds it.
    assert hf_greedy(path, PROMPTS[:1], 4, trust_remote_code=True) == hf_greedy(
        flab, PROMPTS[:1], 4, trust_remote_code=True
    )
    with pytest.raises(UnsupportedModelError, match=r"FlabAttention .* must pass the forward \*\*kwargs down"):
        Engine(str(path), trust_remote_code=True)


def test_build_refuses_unknown_twin(tmp_path):
    with pytest.raises(ValueError, match="broken must be one of"):
        build(tmp_path / "x", broken="no-rope")


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "examples" / "remote_code_model"], ids=["repo-root", "own-folder"])
def test_build_command(tmp_path, cwd):
    """The documented command writes a loadable folder, from the repository root and from the example's folder."""
    out = tmp_path / "twin"
    cmd = [sys.executable, "-m", "examples.remote_code_model.build"] if cwd == ROOT else [sys.executable, "build.py"]
    proc = subprocess.run(
        [*cmd, str(out), "--broken", "no-kwargs"], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote a twin that forgets: {BREAKAGES['no-kwargs'].rule} to {out}" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "modeling_flab.py", "configuration_flab.py", "model.safetensors"} <= names
    assert "tokenizer.json" in names or "tokenizer_config.json" in names
    assert BREAKAGES["no-kwargs"].broken_line in (out / "modeling_flab.py").read_text()
