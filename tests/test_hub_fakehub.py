"""backend.loading.hub against huggingface_hub's real download/search code and a local fake of the Hub's HTTP API
(repo info, tree listing, resolve HEAD/GET, model search). Checks the parts a mock cannot: that our
tqdm_class fits what snapshot_download 2.x creates, the two-step fetch, the cache, offline reuse."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from huggingface_hub import constants
from safetensors.torch import save_file
from transformers import LlamaConfig

from backend.core.errors import GatedModelError, ModelNotFoundError, UnsupportedModelError
from backend.loading import hub, memory

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


class FakeHub:
    """repos: {repo_id: {path: bytes}}; gated: repo ids whose files answer 403 GatedRepo."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: tuple[str, ...] = ()) -> None:
        self.repos, self.gated, self.requests = repos, gated, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                fake.answer(self, head=True)

            def do_GET(self) -> None:
                fake.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @staticmethod
    def send(
        h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False
    ) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        self.requests.append((h.command, path, parse_qs(url.query)))
        parts = path.strip("/").split("/")
        as_json = {"Content-Type": "application/json"}
        if path == "/api/models":  # search
            body = [
                {
                    "id": "org/tiny",
                    "downloads": 42,
                    "likes": 3,
                    "gated": False,
                    "library_name": "transformers",
                    "safetensors": {"parameters": {"BF16": 5000}, "total": 5000},
                }
            ]
            return self.send(h, 200, json.dumps(body).encode(), as_json, head)
        if parts[:2] == ["api", "models"]:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            if repo not in self.repos:
                missing = {**as_json, "X-Error-Code": "RepoNotFound"}
                return self.send(h, 404, b'{"error": "Repository not found"}', missing)
            files = self.repos[repo]
            if rest[:1] == ["revision"]:
                body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                return self.send(h, 200, json.dumps(body).encode(), as_json, head)
            if rest[:1] == ["tree"]:
                body = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
                return self.send(h, 200, json.dumps(body).encode(), as_json, head)
        if len(parts) >= 5 and parts[2] == "resolve":  # /{owner}/{name}/resolve/{revision}/{file}
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo in self.gated:
                return self.send(h, 403, b'{"error": "gated"}', {**as_json, "X-Error-Code": "GatedRepo"}, head)
            data = self.repos.get(repo, {}).get(name)
            if data is None:
                return self.send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            etag = hashlib.sha256(data).hexdigest()
            return self.send(h, 200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}, head)
        return self.send(h, 404, b"", None, head)

    def fetched(self) -> list[str]:
        return sorted(
            p.split("/resolve/")[1].split("/", 1)[1] for c, p, _ in self.requests if c == "GET" and "/resolve/" in p
        )

    def close(self) -> None:
        if self.server.fileno() != -1:
            self.server.shutdown()
            self.server.server_close()


def tiny_repo(tmp_path: Path) -> dict[str, bytes]:
    LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(tmp_path)
    import torch

    save_file(
        {"model.embed_tokens.weight": torch.zeros(64, 32), "lm_head.weight": torch.ones(64, 32)},
        str(tmp_path / "shard.safetensors"),
    )
    shard = (tmp_path / "shard.safetensors").read_bytes()
    index = {
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    }
    return {
        "config.json": (tmp_path / "config.json").read_bytes(),
        "tokenizer.json": b'{"t": 1}',
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": shard,
        "model-00002-of-00002.safetensors": shard + b" ",
        "consolidated.safetensors": b"c" * 5000,
        "pytorch_model.bin": b"b" * 100,
        "model.Q4.gguf": b"GGUF",
    }


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    repos = {
        "org/tiny": tiny_repo(tmp_path),
        "org/gguf": {"model.Q4.gguf": b"GGUF", "README.md": b"#"},
        "org/gated": {"config.json": b"{}", "model.safetensors": b"x"},
    }
    fake = FakeHub(repos, gated=("org/gated",))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield fake
    fake.close()


def test_download_with_progress_then_offline_from_cache(fake_hub, monkeypatch):
    events: list[hub.DownloadProgress] = []
    folder = hub.resolve_model("org/tiny", progress=events.append)
    repo = fake_hub.repos["org/tiny"]
    weights = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert folder.name == COMMIT
    assert fake_hub.fetched() == sorted(["config.json", "model.safetensors.index.json", "tokenizer.json", *weights])
    total = sum(len(repo[n]) for n in ["config.json", "model.safetensors.index.json", "tokenizer.json", *weights])
    assert events[-1] == hub.DownloadProgress("done", total, total, None, 5, 5)
    assert any(e.stage == "download" and 0 < e.bytes_done < total for e in events)
    assert hub.list_cached_models() == ["org/tiny"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(fake_hub.requests)
    assert hub.resolve_model("org/tiny") == folder
    assert len(fake_hub.requests) == before  # nothing asked of the Hub
    est = memory.estimate_memory("org/tiny", context_len=8)  # offline: from the cached snapshot's headers
    assert est.weight_bytes == 2 * 64 * 32 * 4 and est.kv_cache_bytes == 2 * 1 * 2 * 8 * 8 * 4
    with pytest.raises(ModelNotFoundError, match="offline mode is on"):
        hub.resolve_model("org/other")

    # a snapshot holding less than our patterns match (fetched by another tool) still serves, offline,
    # as long as config.json and every indexed weight file are there
    (folder / "tokenizer.json").unlink()
    assert hub.resolve_model("org/tiny") == folder
    (folder / weights[1]).unlink()
    with pytest.raises(ModelNotFoundError, match=f"{weights[1]} .*not in the local cache and offline mode is on"):
        hub.resolve_model("org/tiny")


def test_errors_through_the_real_library(fake_hub):
    with pytest.raises(ModelNotFoundError, match="check the id or log in"):
        hub.resolve_model("org/missing")
    with pytest.raises(GatedModelError, match="https://huggingface.co/org/gated"):
        hub.resolve_model("org/gated")
    with pytest.raises(UnsupportedModelError, match="GGUF is not supported"):
        hub.resolve_model("org/gguf")
    assert not any("gguf" in p.lower() for p in fake_hub.fetched())


def test_search_through_the_real_library(fake_hub):
    results = hub.search_models("tiny", limit=3)
    assert results == [hub.HubModel("org/tiny", 42, 3, 5000, 10000, False, "transformers")]
    (query,) = [q for c, p, q in fake_hub.requests if p == "/api/models"]
    assert query["search"] == ["tiny"] and query["pipeline_tag"] == ["text-generation"]
    assert query["sort"] == ["downloads"] and query["limit"] == ["3"] and "safetensors" in query["expand"]


def test_hub_unreachable_without_offline_mode_uses_the_cache(fake_hub, monkeypatch):
    folder = hub.resolve_model("org/tiny")
    fake_hub.close()  # the Hub goes away; HF_HUB_OFFLINE stays unset
    assert hub.resolve_model("org/tiny") == folder
    assert memory.estimate_memory("org/tiny", context_len=8).weight_bytes == 2 * 64 * 32 * 4
    with pytest.raises(ModelNotFoundError, match=r"the Hub cannot be reached .*`hf download org/other`"):
        hub.resolve_model("org/other")
    assert hub.search_models("tiny") == [] and hub.search_models("tiny").offline
