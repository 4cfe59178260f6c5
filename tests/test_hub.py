"""backend.loading.hub: local folders, Hub downloads (mocked at huggingface_hub's functions), errors, search,
cache listing, memory estimates. No network: huggingface_hub is monkeypatched at its public functions."""

from __future__ import annotations

import fnmatch
import http.server
import json
import socket
import threading
from pathlib import Path

import httpx2
import huggingface_hub as hf
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.hf_api import ModelInfo, RepoFile
from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
from safetensors.torch import save_file
from transformers import LlamaConfig

from backend.core.errors import GatedModelError, ModelNotFoundError, QuantizationError, UnsupportedModelError
from backend.loading import hub, memory
from backend.loading.memory import TensorMeta, compute_estimate

COMMIT = "0123456789abcdef0123456789abcdef01234567"
V, H, FF, L, NH, NKV = 64, 32, 48, 2, 4, 2  # tiny Llama: vocab, hidden, intermediate, layers, heads, kv heads


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def llama_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    kv = NKV * (H // NH)
    t = {
        "model.embed_tokens.weight": torch.randn(V, H),
        "model.norm.weight": torch.ones(H),
        "lm_head.weight": torch.randn(V, H),
    }
    for i in range(L):
        p = f"model.layers.{i}."
        t.update(
            {
                p + "self_attn.q_proj.weight": torch.randn(H, H),
                p + "self_attn.k_proj.weight": torch.randn(kv, H),
                p + "self_attn.v_proj.weight": torch.randn(kv, H),
                p + "self_attn.o_proj.weight": torch.randn(H, H),
                p + "mlp.gate_proj.weight": torch.randn(FF, H),
                p + "mlp.up_proj.weight": torch.randn(FF, H),
                p + "mlp.down_proj.weight": torch.randn(H, FF),
                p + "input_layernorm.weight": torch.ones(H),
                p + "post_attention_layernorm.weight": torch.ones(H),
            }
        )
    return {k: v.to(dtype) for k, v in t.items()}


def make_model_dir(path: Path, dtype: torch.dtype = torch.float32, **config) -> Path:
    LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=NH,
        num_key_value_heads=NKV,
        max_position_embeddings=128,
        **config,
    ).save_pretrained(path)
    save_file(llama_tensors(dtype), str(path / "model.safetensors"))
    return path


def single_file_repo(tmp_path: Path) -> dict[str, bytes]:
    src = make_model_dir(tmp_path / "src")
    return {name: (src / name).read_bytes() for name in ("config.json", "model.safetensors")}


def reachable() -> hub.HubConnectivity:
    return hub.HubConnectivity(probe=lambda endpoint, timeout: True)


def hub_error(cls, status: int = 404):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls("boom", response=response)


# ------------------------------------------------------------------------------------------ local


def test_local_folder_resolves_to_itself(tmp_path):
    folder = make_model_dir(tmp_path / "m")
    events = []
    assert hub.resolve_model(str(folder), progress=events.append) == folder
    assert events[-1].stage == "done" and events[-1].bytes_total == (folder / "model.safetensors").stat().st_size


def test_local_folder_without_config(tmp_path):
    folder = make_model_dir(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        hub.resolve_model(str(folder))


def test_missing_path_and_plain_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no folder"):
        hub.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        hub.resolve_model(str(tmp_path / "weights.safetensors"))


def test_gguf_file_and_gguf_folder_are_refused(tmp_path):
    (tmp_path / "model.Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(UnsupportedModelError, match="GGUF is not supported"):
        hub.resolve_model(str(tmp_path / "model.Q4_K_M.gguf"))
    with pytest.raises(UnsupportedModelError, match="GGUF is not supported"):
        hub.resolve_model(str(tmp_path))  # a folder with GGUF only
    with pytest.raises(UnsupportedModelError, match="GGUF is not supported"):
        memory.estimate_memory(str(tmp_path))


def test_local_folder_with_bin_weights_only(tmp_path):
    folder = make_model_dir(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match=r"only safetensors checkpoints are loaded"):
        hub.resolve_model(str(folder))


# ----------------------------------------------------------------------------------- hub download


class FakeSnapshot:
    """snapshot_download stand-in: records its calls, 'downloads' the allowed files of `repo` into a snapshot."""

    def __init__(self, cache: Path, repo: dict[str, bytes]) -> None:
        self.cache, self.repo, self.calls = cache, repo, []

    def __call__(self, repo_id: str, **kw) -> str:
        self.calls.append(kw)
        folder = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.repo.items():
            allowed = any(fnmatch.fnmatchcase(name, p) for p in kw["allow_patterns"])
            ignored = any(fnmatch.fnmatchcase(name, p) for p in kw["ignore_patterns"])
            if allowed and not ignored:
                (folder / name).write_bytes(data)
        return str(folder)


def fake_tree(files: dict[str, bytes]):
    def get_cached_repo_tree(repo_id, revision=None, cache_dir=None, **_):
        assert revision == COMMIT  # pinned by the first snapshot
        return [RepoFile(path=name, size=len(data), oid="0" * 40) for name, data in files.items()]

    return get_cached_repo_tree


def sharded_repo(tmp_path: Path) -> dict[str, bytes]:
    src = make_model_dir(tmp_path / "src")
    tensors = llama_tensors()
    first = {k: v for k, v in tensors.items() if "layers.1" not in k}
    second = {k: v for k, v in tensors.items() if "layers.1" in k}
    save_file(first, str(src / "model-00001-of-00002.safetensors"))
    save_file(second, str(src / "model-00002-of-00002.safetensors"))
    index = {
        "weight_map": {
            **{k: "model-00001-of-00002.safetensors" for k in first},
            **{k: "model-00002-of-00002.safetensors" for k in second},
        }
    }
    return {
        "config.json": (src / "config.json").read_bytes(),
        "generation_config.json": b"{}",
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": (src / "model-00001-of-00002.safetensors").read_bytes(),
        "model-00002-of-00002.safetensors": (src / "model-00002-of-00002.safetensors").read_bytes(),
        "consolidated.safetensors": b"duplicate weights, never fetched",
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "chat_template.jinja": b"{{ x }}",
        "modeling_custom.py": b"# remote code",
        "pytorch_model.bin": b"pickle",
        "model.gguf": b"GGUF",
        "flax_model.msgpack": b"m",
        "tf_model.h5": b"h",
    }


def test_hub_download_fetches_only_what_the_engine_reads(tmp_path, hub_cache, online, monkeypatch):
    repo = sharded_repo(tmp_path)
    fake = FakeSnapshot(hub_cache, repo)
    monkeypatch.setattr(hf, "snapshot_download", fake)
    monkeypatch.setattr(hf, "get_cached_repo_tree", fake_tree(repo))
    folder = hub.resolve_model("org/model", revision="main", token="hf_x")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "modeling_custom.py",
        ]
    )
    first, second = fake.calls
    assert first["revision"] == "main" and second["revision"] == COMMIT
    for call in fake.calls:
        assert call["token"] == "hf_x" and call["local_files_only"] is False and call["tqdm_class"] is None
        for banned in ("x.bin", "x.pt", "x.gguf", "x.msgpack", "x.h5", "x.pth", "x.onnx"):
            assert any(fnmatch.fnmatchcase(banned, p) for p in call["ignore_patterns"])
            assert not any(fnmatch.fnmatchcase(banned, p) for p in call["allow_patterns"])
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "configuration_x.py",
    ):
        assert any(fnmatch.fnmatchcase(name, p) for p in first["allow_patterns"]), name
    assert second["allow_patterns"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_single_file_repo_takes_top_level_safetensors(tmp_path, hub_cache, online, monkeypatch):
    repo = {**single_file_repo(tmp_path), "onnx/model.safetensors": b"not this one"}
    fake = FakeSnapshot(hub_cache, repo)
    monkeypatch.setattr(hf, "snapshot_download", fake)
    monkeypatch.setattr(hf, "get_cached_repo_tree", fake_tree(repo))
    assert (hub.resolve_model("org/model") / "model.safetensors").is_file()
    assert fake.calls[1]["allow_patterns"] == ["model.safetensors"]


def test_offline_uses_the_cache_only(tmp_path, hub_cache, offline, monkeypatch):
    repo = single_file_repo(tmp_path)
    fake = FakeSnapshot(hub_cache, repo)
    monkeypatch.setattr(hf, "snapshot_download", fake)
    monkeypatch.setattr(hf, "get_cached_repo_tree", fake_tree(repo))
    hub.resolve_model("org/model")
    assert [c["local_files_only"] for c in fake.calls] == [True, True]


def test_offline_cached_snapshot_with_the_real_library(tmp_path, hub_cache, offline):
    """A cache written by another tool (no tree listing): huggingface_hub's own offline lookup finds it."""
    root = hub_cache / "models--org--model"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for name, data in single_file_repo(tmp_path).items():
        (snapshot / name).write_bytes(data)
    assert hub.resolve_model("org/model") == snapshot
    assert hub.list_cached_models() == ["org/model"]
    assert memory.estimate_memory("org/model").weight_bytes == 4 * sum(t.numel() for t in llama_tensors().values())


@pytest.mark.parametrize(
    "files, message",
    [
        ({"model-q4.gguf": b"GGUF", "README.md": b""}, "GGUF is not supported"),
        (
            {"config.json": b"{}", "pytorch_model.bin": b"x"},
            r"no \*\.safetensors weights \(it has \.bin files\); only safetensors",
        ),
    ],
)
def test_repo_without_safetensors_is_refused(hub_cache, online, monkeypatch, files, message):
    fake = FakeSnapshot(hub_cache, files)
    monkeypatch.setattr(hf, "snapshot_download", fake)
    monkeypatch.setattr(hf, "get_cached_repo_tree", fake_tree(files))
    with pytest.raises(UnsupportedModelError, match=message):
        hub.resolve_model("org/model")
    assert len(fake.calls) == 1  # refused before any weight download


@pytest.mark.parametrize(
    "error, expected, message",
    [
        (hub_error(RepositoryNotFoundError), ModelNotFoundError, "check the id or log in"),
        (
            hub_error(GatedRepoError, 403),
            GatedModelError,
            r"accept the terms at https://huggingface.co/org/model and set HF_TOKEN",
        ),
        (
            LocalEntryNotFoundError("not cached"),
            ModelNotFoundError,
            r"not in the local cache .* `hf download org/model`",
        ),
    ],
)
def test_hub_errors_are_mapped(online, monkeypatch, error, expected, message):
    def raising(*args, **kwargs):
        raise error

    monkeypatch.setattr(hf, "snapshot_download", raising)
    with pytest.raises(expected, match=message):
        hub.resolve_model("org/model")


def test_offline_and_not_cached_with_the_real_library(offline):
    """huggingface_hub's own snapshot_download, offline, on an empty cache: no network is touched."""
    with pytest.raises(ModelNotFoundError, match=r"offline mode is on .*`hf download org/model`.*local folder"):
        hub.resolve_model("org/model")


def test_invalid_hub_id_with_the_real_library(offline):
    with pytest.raises(ModelNotFoundError, match="valid Hub id"):
        hub.resolve_model("org/bad--name")


def test_progress_callback_is_fed(tmp_path, hub_cache, online, monkeypatch):
    """Drive the tqdm_class exactly as huggingface_hub 2.4's snapshot_download does (its own helpers)."""
    from huggingface_hub.utils.tqdm import _create_progress_bar, hf_thread_map

    repo = single_file_repo(tmp_path)
    store = FakeSnapshot(hub_cache, repo)

    def snapshot_download(repo_id, **kw):
        cls = kw["tqdm_class"]
        names = [n for n in repo if any(fnmatch.fnmatchcase(n, p) for p in kw["allow_patterns"])]
        transfer = _create_progress_bar(
            cls=cls,
            log_level=30,
            name="huggingface_hub.snapshot_download.transfer",
            desc="Downloading bytes",
            total=0,
            initial=0,
            unit="B",
            unit_scale=True,
        )
        written = _create_progress_bar(
            cls=cls,
            log_level=30,
            name="huggingface_hub.snapshot_download",
            desc="Reconstructing",
            total=0,
            initial=0,
            unit="B",
            unit_scale=True,
        )

        def fetch(name):
            written.total += len(repo[name])
            transfer.total = 10**9  # a guess that must not leak into the report
            for _ in range(2):
                written.update(len(repo[name]) // 2)
                transfer.update(1)
            written.update(len(repo[name]) % 2)

        hf_thread_map(fetch, names, desc=f"Fetching {len(names)} files", max_workers=2, tqdm_class=cls)
        return store(repo_id, **kw)

    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hf, "get_cached_repo_tree", fake_tree(repo))
    events: list[hub.DownloadProgress] = []
    hub.resolve_model("org/model", progress=events.append)
    total = sum(len(b) for b in repo.values())
    downloads = [e for e in events if e.stage == "download"]
    assert downloads and all(e.bytes_total <= total and 0 <= e.bytes_done <= e.bytes_total for e in downloads)
    assert any(0 < e.bytes_done < e.bytes_total for e in downloads)
    assert events[-1] == hub.DownloadProgress("done", total, total, None, 2, 2)
    assert events[-1].fraction == 1.0


# ------------------------------------------------------------------------------------------ offline


def test_is_offline_from_env_without_probing(offline):
    def probe(endpoint, timeout):
        raise AssertionError("must not probe when offline mode is set")

    assert hub.is_offline(hub.HubConnectivity(probe=probe))


def test_is_offline_probe_is_cached_per_instance(online):
    calls = []

    def probe(endpoint, timeout):
        calls.append((endpoint, timeout))
        return False

    conn = hub.HubConnectivity(endpoint="http://hub.test", timeout_s=0.5, probe=probe)
    assert hub.is_offline(conn) and hub.is_offline(conn)
    assert calls == [("http://hub.test", 0.5)]
    conn.invalidate()
    conn.probe = lambda endpoint, timeout: True
    assert not hub.is_offline(conn)


def test_default_probe_against_local_servers():
    from backend.loading.hub_common import probe_endpoint

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        assert probe_endpoint(f"http://127.0.0.1:{server.server_address[1]}", 2.0)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    assert not probe_endpoint(f"http://127.0.0.1:{closed_port}", 0.5)


# ------------------------------------------------------------------------------------------- search


def test_search_maps_the_hub_answer(online, monkeypatch):
    seen = {}

    def list_models(self, **kw):
        seen.update(kw)
        return iter(
            [
                ModelInfo(
                    id="org/small",
                    downloads=10,
                    likes=1,
                    gated=False,
                    library_name="transformers",
                    safetensors={"parameters": {"BF16": 1000}, "total": 1000},
                ),
                ModelInfo(
                    id="org/big",
                    downloads=500,
                    likes=7,
                    gated="manual",
                    library_name="transformers",
                    safetensors={"parameters": {"F32": 10, "BF16": 100}, "total": 110},
                ),
                ModelInfo(id="org/nosafetensors", downloads=3, likes=0),
            ]
        )

    monkeypatch.setattr(hf.HfApi, "list_models", list_models)
    results = hub.search_models("llama", limit=5, connectivity=reachable())
    assert seen["search"] == "llama" and seen["pipeline_tag"] == "text-generation" and seen["sort"] == "downloads"
    assert seen["limit"] == 5 and {"downloads", "likes", "gated", "safetensors", "library_name"} <= set(seen["expand"])
    assert [m.id for m in results] == ["org/big", "org/small", "org/nosafetensors"]
    assert results[0] == hub.HubModel("org/big", 500, 7, 110, 240, True, "transformers")
    assert results[1].size_bytes == 2000 and results[2].params is None and results[2].size_bytes is None
    assert not results.offline and results.error is None


def test_search_offline_is_empty(offline, monkeypatch):
    monkeypatch.setattr(hf.HfApi, "list_models", lambda self, **kw: pytest.fail("no request when offline"))
    results = hub.search_models("llama")
    assert results == [] and results.offline and "offline" in results.error


def test_search_network_failure_is_empty(online, monkeypatch):
    def list_models(self, **kw):
        raise httpx2.ConnectError("no route to host")

    monkeypatch.setattr(hf.HfApi, "list_models", list_models)
    results = hub.search_models("llama", connectivity=reachable())
    assert results == [] and results.offline and "ConnectError" in results.error


def test_search_probes_first_and_skips_an_unreachable_hub(online, monkeypatch):
    monkeypatch.setattr(hf.HfApi, "list_models", lambda self, **kw: pytest.fail("no search when the Hub is down"))
    conn = hub.HubConnectivity(endpoint="http://hub.test", probe=lambda endpoint, timeout: False)
    results = hub.search_models("llama", connectivity=conn)
    assert results == [] and results.offline and "http://hub.test" in results.error


def test_suggested_models():
    assert isinstance(hub.SUGGESTED_MODELS, tuple) and len(hub.SUGGESTED_MODELS) >= 8
    assert "Qwen/Qwen2.5-0.5B-Instruct" in hub.SUGGESTED_MODELS and all("/" in m for m in hub.SUGGESTED_MODELS)


# -------------------------------------------------------------------------------------------- cache


def test_cached_models_empty_or_missing_cache(hub_cache):
    assert hub.list_cached_models() == []  # missing folder
    hub_cache.mkdir()
    assert hub.list_cached_models() == []  # empty folder


def test_cached_models_lists_loadable_model_repos(tmp_path, hub_cache):
    for repo, files in {
        "models--org--good": ("config.json", "model.safetensors"),
        "models--org--tokenizer-only": ("tokenizer.json",),
        "datasets--org--data": ("config.json", "model.safetensors"),
    }.items():
        snap = hub_cache / repo / "snapshots" / COMMIT
        snap.mkdir(parents=True)
        (hub_cache / repo / "refs").mkdir()
        (hub_cache / repo / "refs" / "main").write_text(COMMIT)
        for name in files:
            (snap / name).write_bytes(b"{}")
    assert hub.list_cached_models() == ["org/good"]
    assert hub.list_cached_models(loadable_only=False) == ["org/good", "org/tokenizer-only"]


# ------------------------------------------------------------------------------------------- memory


def test_estimate_local_auto_is_the_exact_tensor_bytes(tmp_path):
    folder = make_model_dir(tmp_path / "m", dtype=torch.bfloat16, torch_dtype="bfloat16")
    tensors = llama_tensors(torch.bfloat16)
    est = memory.estimate_memory(str(folder), context_len=100, num_seqs=3)
    assert est.weight_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert est.params == sum(t.numel() for t in tensors.values())
    assert est.kv_cache_bytes == 2 * L * NKV * (H // NH) * 100 * 3 * 2  # bf16 KV
    assert est.total_bytes == est.weight_bytes + est.kv_cache_bytes
    assert est.dtype == "auto (BF16)" and "KV cache" in est.human and str(est) == est.human
    assert (
        memory.estimate_memory(str(folder), context_len=100, kv_dtype_bytes=1).kv_cache_bytes == L * NKV * 8 * 100 * 2
    )


def test_estimate_scales_with_dtype_and_quantization(tmp_path):
    folder = make_model_dir(tmp_path / "m", dtype=torch.float32)
    tensors = llama_tensors()
    linears = {k: v for k, v in tensors.items() if "layers" in k and v.dim() == 2}
    rest = sum(v.numel() for k, v in tensors.items() if k not in linears)  # embeddings, lm_head, norms
    lin_params = sum(v.numel() for v in linears.values())
    rows = sum(v.shape[0] for v in linears.values())

    auto = memory.estimate_memory(str(folder))
    half = memory.estimate_memory(str(folder), dtype="float16")
    assert auto.weight_bytes == 4 * (rest + lin_params) and half.weight_bytes == auto.weight_bytes // 2
    int8 = memory.estimate_memory(str(folder), dtype="bfloat16", quantization="int8")
    assert int8.weight_bytes == 2 * rest + lin_params + 2 * rows  # 1 byte/param + a bf16 scale per row
    int4 = memory.estimate_memory(str(folder), dtype="bfloat16", quantization="int4")
    # group size: 32 when in_features = 32; in_features = 48 has no divisor in 256/128/64/32 -> one group per row
    assert int4.weight_bytes == 2 * rest + lin_params // 2 + 2 * 2 * rows  # scales + zero points, bf16
    fp8 = memory.estimate_memory(str(folder), dtype="bfloat16", quantization="fp8")
    assert fp8.weight_bytes == 2 * rest + lin_params + 4 * rows
    assert int4.weight_bytes < int8.weight_bytes < half.weight_bytes < auto.weight_bytes
    assert int8.kv_cache_bytes == half.kv_cache_bytes == auto.kv_cache_bytes // 2  # float32 config -> KV at fp32
    with pytest.raises(QuantizationError):
        memory.estimate_memory(str(folder), quantization="int3")
    with pytest.raises(ValueError, match="unknown dtype"):
        memory.estimate_memory(str(folder), dtype="float64")


def test_estimate_int4_at_scale_is_near_half_a_byte_per_param():
    tensors = [TensorMeta("model.embed_tokens.weight", "BF16", (32000, 4096))]
    tensors += [TensorMeta(f"model.layers.{i}.mlp.up_proj.weight", "BF16", (11008, 4096)) for i in range(8)]
    lin = 8 * 11008 * 4096
    config = {"num_hidden_layers": 8, "num_attention_heads": 32, "hidden_size": 4096, "torch_dtype": "bfloat16"}
    int4 = compute_estimate(config, tensors, "auto", "int4", 128)
    int8 = compute_estimate(config, tensors, "auto", "int8")
    embed = 32000 * 4096 * 2
    assert (int4.weight_bytes - embed) / lin == pytest.approx(0.5 + 4 / 128, rel=1e-6)
    assert (int8.weight_bytes - embed) / lin == pytest.approx(1 + 2 / 4096, rel=1e-6)


MOE_CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 1024, "torch_dtype": "bfloat16"}


def _moe_tensors(per_expert: bool) -> list[TensorMeta]:
    """A 2-layer MoE of 8 experts (hidden 1024, intermediate 2048): attention + per-expert or stacked experts."""
    tensors = [TensorMeta("model.embed_tokens.weight", "BF16", (1000, 1024))]
    for i in range(2):
        tensors.append(TensorMeta(f"model.layers.{i}.self_attn.qkv_proj.weight", "BF16", (3072, 1024)))
        if per_expert:
            tensors += [
                TensorMeta(f"model.layers.{i}.mlp.experts.{e}.{n}.weight", "BF16", shape)
                for e in range(8)
                for n, shape in (("gate_proj", (2048, 1024)), ("up_proj", (2048, 1024)), ("down_proj", (1024, 2048)))
            ]
        else:
            tensors.append(TensorMeta(f"model.layers.{i}.mlp.experts.gate_up_proj", "BF16", (8, 4096, 1024)))
            tensors.append(TensorMeta(f"model.layers.{i}.mlp.experts.down_proj", "BF16", (8, 1024, 2048)))
    return tensors


@pytest.mark.parametrize("per_expert", [True, False])
def test_moe_experts_are_quantized_but_load_at_full_precision_first(per_expert):
    """Experts are quantized as each layer's have loaded (backend/quantization/experts.py): the steady weights
    count them quantized, the load peak one layer's at full precision; a checkpoint of per-expert tensors whose
    conversion only transformers' converter applies loads whole, all at full precision."""
    tensors = _moe_tensors(per_expert)
    expert_params = 2 * 8 * 3 * 2048 * 1024
    full = compute_estimate({**MOE_CONFIG, "architectures": ["MixtralForCausalLM"]}, tensors, "auto")
    int4 = compute_estimate({**MOE_CONFIG, "architectures": ["MixtralForCausalLM"]}, tensors, "auto", "int4", 128)
    assert full.load_peak_bytes == full.weight_bytes  # nothing quantized: loading holds what serving holds
    saved_per_param = 2 - 0.5 - 4 / 128  # bf16 -> int4 codes + a bf16 scale and zero point per 128
    linear_params = 2 * 3072 * 1024  # the qkv projections
    assert full.weight_bytes - int4.weight_bytes == pytest.approx((expert_params + linear_params) * saved_per_param)
    # native Mixtral: each layer's experts are quantized once loaded: at most one layer's at full precision
    assert int4.load_peak_bytes - int4.weight_bytes == pytest.approx(expert_params / 2 * saved_per_param)
    assert int4.peak_bytes == max(int4.total_bytes, int4.load_peak_bytes)
    assert "peak while loading" in " ".join(int4.notes) and "at the peak of loading" in int4.human
    # no native implementation: OLMoE's declared conversion streams per-expert tensors in (conversions.py)
    olmoe = {**MOE_CONFIG, "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe"}
    assert compute_estimate(olmoe, tensors, "auto", "int4", 128).load_peak_bytes == int4.load_peak_bytes
    # a conversion it does not stream (sarvam_moe): transformers' converter, the whole model at full precision first
    sarvam = {**MOE_CONFIG, "architectures": ["SarvamMoEForCausalLM"], "model_type": "sarvam_moe"}
    other = compute_estimate(sarvam, tensors, "auto", "int4", 128)
    if per_expert:
        assert other.load_peak_bytes == full.weight_bytes
    else:  # stacked tensors stream in by name: as native
        assert other.load_peak_bytes == int4.load_peak_bytes


def test_kv_config_variants():
    tensors = [TensorMeta("w.weight", "BF16", (4, 4))]
    no_head_dim = {"num_hidden_layers": 3, "num_attention_heads": 8, "hidden_size": 256}  # MHA, head_dim = 32
    assert compute_estimate(no_head_dim, tensors, context_len=10).kv_cache_bytes == 2 * 3 * 8 * 32 * 10 * 2
    explicit = {
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "hidden_size": 256,
        "head_dim": 64,
        "torch_dtype": "float32",
    }
    assert compute_estimate(explicit, tensors, context_len=10).kv_cache_bytes == 2 * 3 * 1 * 64 * 10 * 4
    multimodal = {
        "model_type": "gemma3",
        "vision_config": {"num_hidden_layers": 27},
        "text_config": {**explicit, "num_hidden_layers": 5},
    }
    assert compute_estimate(multimodal, tensors, context_len=10).kv_cache_bytes == 2 * 5 * 1 * 64 * 10 * 4
    gpt2 = {"n_layer": 2, "n_head": 4, "n_embd": 64}
    assert compute_estimate(gpt2, tensors, context_len=10, kv_dtype_bytes=2).kv_cache_bytes == 2 * 2 * 4 * 16 * 10 * 2


def test_estimate_hub_id_reads_headers_and_config_only(tmp_path, online, monkeypatch):
    config = tmp_path / "config.json"
    LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=NH,
        num_key_value_heads=NKV,
        torch_dtype="bfloat16",
    ).to_json_file(config)
    infos = {
        k: TensorInfo(dtype="BF16", shape=list(v.shape), data_offsets=(0, v.numel() * 2))
        for k, v in llama_tensors().items()
    }
    files = {"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=infos)}
    meta = SafetensorsRepoMetadata(
        metadata=None, sharded=False, weight_map={k: "model.safetensors" for k in infos}, files_metadata=files
    )
    downloads = []

    def hf_hub_download(repo_id, filename, **kw):
        downloads.append(filename)
        return str(config)

    monkeypatch.setattr(hf.HfApi, "get_safetensors_metadata", lambda self, repo_id, **kw: meta)
    monkeypatch.setattr(hf, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(hf, "snapshot_download", lambda *a, **k: pytest.fail("must not download weights"))
    est = memory.estimate_memory("org/model", context_len=64)
    assert downloads == ["config.json"]
    assert est.weight_bytes == 2 * sum(v.numel() for v in llama_tensors().values())
    assert est.kv_cache_bytes == 2 * L * NKV * 8 * 64 * 2


def test_estimate_gated_hub_id(online, monkeypatch):
    def gated(self, repo_id, **kw):
        raise hub_error(GatedRepoError, 401)

    monkeypatch.setattr(hf.HfApi, "get_safetensors_metadata", gated)
    with pytest.raises(GatedModelError, match="accept the terms"):
        memory.estimate_memory("org/model")


def test_format_bytes():
    assert memory.format_bytes(0) == "0 B" and memory.format_bytes(1023) == "1023 B"
    assert memory.format_bytes(1536) == "1.50 KiB" and memory.format_bytes(3 * 2**30) == "3.00 GiB"
    assert memory.format_bytes(40 * 2**30) == "40.0 GiB" and memory.format_bytes(-2048) == "-2.00 KiB"
