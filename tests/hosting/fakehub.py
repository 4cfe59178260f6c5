"""The fake Hub of tests/test_hub_fakehub.py (a local HTTP server answering huggingface_hub's requests), pointed to
by the environment for one test: the network boundary, so the real huggingface_hub code runs."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants

from tests.test_hub_fakehub import FakeHub


def safetensors_header_only(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file's header declaring `tensors` ({name: (dtype, shape)}) and none of their data: the
    estimate reads headers only, so a 'model' of any declared size is a few hundred bytes."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def llama_config(**extra) -> bytes:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
    }
    config.update(extra)
    return json.dumps(config).encode()


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@contextmanager
def fake_hub(monkeypatch, cache: Path, repos: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    fake = FakeHub(repos)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    try:
        yield fake
    finally:
        fake.close()


def cached_weight_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".safetensors"]
