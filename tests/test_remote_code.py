"""Remote-code models: run when they route attention through ALL_ATTENTION_FUNCTIONS, refused otherwise."""

import pytest

from backend import Engine, SamplingParams
from backend.errors import UnsupportedModelError
from backend.tools.tiny_models import build_remote_code_model
from tests.helpers import PROMPTS, hf_greedy


def test_remote_code_model_matches_hf_generate(tmp_path):
    path = build_remote_code_model(tmp_path / "flab")
    expected = hf_greedy(path, PROMPTS, 8, trust_remote_code=True)
    with Engine(str(path), trust_remote_code=True, dtype="float32") as engine:
        assert engine.model_impl == "transformers"
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected


def test_remote_code_needs_trust(tmp_path):
    path = build_remote_code_model(tmp_path / "flab")
    with pytest.raises(UnsupportedModelError, match="trust_remote_code"):
        Engine(str(path))


def test_remote_code_without_attention_backend_is_refused(tmp_path):
    path = build_remote_code_model(tmp_path / "flab_no", supports_attention_backend=False)
    with pytest.raises(UnsupportedModelError, match="ALL_ATTENTION_FUNCTIONS"):
        Engine(str(path), trust_remote_code=True)
