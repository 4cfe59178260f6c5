"""Cache faults are clear errors and a damaged built-in model heals (issue 26, item 9): a built-in whose weight
file was deleted, truncated or overwritten is built again (its build marker does not vouch for missing or
unreadable files); a cache folder that cannot be written is a CacheDirError naming the folder and FLAB_CACHE_DIR
(also from launch_server, without a traceback); messages about a built-in's files speak of building it, not of
downloading it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend import Engine, SamplingParams, paths
from backend.core.errors import CacheDirError, EngineError, UnsupportedModelError
from backend.loading import builtin

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny:llama"


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _generates(folder_or_name: str) -> bool:
    with Engine(folder_or_name, dtype="float32", num_kv_blocks=16) as engine:
        return len(engine.generate(["hi"], SamplingParams(max_new_tokens=2, temperature=0))[0].token_ids) == 2


def test_the_build_marker_lists_every_file_with_its_size(cache):
    folder = builtin.resolve_builtin(NAME)
    info = json.loads((folder / builtin.BUILD_INFO).read_text())
    assert info["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    assert set(info["files"]) == {f.name for f in folder.iterdir() if f.name != builtin.BUILD_INFO}


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage header"])
def test_a_damaged_built_in_is_built_again(cache, damage):
    folder = builtin.resolve_builtin(NAME)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if damage == "delete":
        weights.unlink()  # what the old message advised
    elif damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
    else:
        with open(weights, "r+b") as f:
            f.write(b"SECRET-7")  # same size, an unreadable header
    assert not builtin.is_complete(folder)
    assert builtin.resolve_builtin(NAME) == folder
    assert builtin.is_complete(folder) and weights.stat().st_size == size
    assert _generates(NAME)


def test_a_corrupt_built_in_file_is_reported_as_a_build_not_a_download(cache):
    folder = builtin.resolve_builtin(NAME)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError) as info:
        Engine(str(folder), dtype="float32", num_kv_blocks=16)
    message = str(info.value)
    assert "built-in model" in message and "download" not in message and paths.CACHE_ENV in message


@pytest.mark.parametrize(
    "error",
    [OSError(errno.EROFS, "Read-only file system"), OSError(errno.ENOSPC, "No space left on device")],
    ids=["read-only", "full"],
)
def test_a_cache_that_cannot_be_written_is_a_cache_dir_error(cache, monkeypatch, error):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(builtin.tempfile, "mkdtemp", refuse)
    with pytest.raises(CacheDirError) as info:
        builtin.resolve_builtin(NAME)
    message = str(info.value)
    assert isinstance(info.value, EngineError) and str(cache) in message and paths.CACHE_ENV in message
    assert error.strerror in message


def test_a_full_disk_while_writing_the_weights_is_a_cache_dir_error(cache, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(builtin, "build_tiny_model", full)
    with pytest.raises(CacheDirError, match="No space left on device") as info:
        builtin.resolve_builtin(NAME)
    assert paths.CACHE_ENV in str(info.value)
    assert not builtin.builtin_path(NAME).exists() and not list((cache / "models").glob(".tiny-llama.building-*"))


def test_launch_server_reports_an_unwritable_cache_without_a_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{paths.CACHE_ENV: str(blocker / "cache")})
    cmd = [sys.executable, "-m", "backend.launch_server", "--model-path", NAME, "--port", "1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "CacheDirError" in done.stderr and str(blocker) in done.stderr and paths.CACHE_ENV in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
