"""From a name to a model folder: local folders, Hub ids (download with progress, offline cache), search,
the local cache and suggestions. (Memory estimates without downloading weights: memory.py.)

Only safetensors checkpoints are fetched: config, tokenizer, remote-code *.py and the weight files the
index names (so a repository that also ships e.g. consolidated.safetensors is not fetched twice).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import huggingface_hub as hf
from huggingface_hub.errors import CacheNotFound, HfHubHTTPError, IncompleteSnapshotError, OfflineModeIsEnabled
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from backend.core.errors import ModelNotFoundError, UnsupportedModelError
from backend.loading.builtin import find_builtin, resolve_builtin
from backend.loading.hub_common import (
    GGUF_MESSAGE,
    SAFETENSORS_DTYPE_BYTES,
    HubConnectivity,
    _TransportError,
    check_local_folder,
    hub_cache_dir,
    hub_errors,
    is_gguf_name,
    is_offline,
    local_path,
    no_safetensors_error,
    offline_mode_enabled,
    safetensors_files,
)
from backend.models.checkpoint import read_index

__all__ = [
    "DownloadProgress",
    "HubConnectivity",
    "HubModel",
    "SearchResults",
    "SUGGESTED_MODELS",
    "is_offline",
    "list_cached_models",
    "resolve_model",
    "search_models",
]

logger = logging.getLogger(__name__)

# Everything but the weights: config, tokenizer (all common formats), chat templates, remote code.
METADATA_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "*.py",
)
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors",)
# Never fetched, even when an allow pattern would match (defence in depth).
IGNORE_PATTERNS: tuple[str, ...] = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.msgpack",
    "*.h5",
    "*.onnx",
    "*.onnx_data",
    "*.ot",
    "*.tflite",
    "*.mlmodel",
    "*.npz",
)

SUGGESTED_MODELS: tuple[str, ...] = (
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen3-0.6B",
    "google/gemma-3-270m-it",  # gated: accept the Gemma terms first
    "meta-llama/Llama-3.2-1B-Instruct",  # gated: accept the Llama 3.2 license first
    "allenai/OLMo-1B-hf",
    "microsoft/Phi-3-mini-4k-instruct",
    "EleutherAI/pythia-160m",
    "openai-community/gpt2",
    "facebook/opt-125m",
)


# ----------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report. `bytes_total` grows as file downloads start (cached files are not counted);
    `file` names the file when known (snapshot downloads report counts, not names)."""

    stage: Literal["download", "done"]
    bytes_done: int
    bytes_total: int
    file: str | None = None
    files_done: int = 0
    files_total: int = 0

    @property
    def fraction(self) -> float:
        return min(1.0, self.bytes_done / self.bytes_total) if self.bytes_total else 0.0


class _ProgressSink:
    """Collects what huggingface_hub's progress bars report and hands it to the callback (from worker threads).

    snapshot_download creates, from the tqdm_class it is given: a files bar (unit 'it', one tick per file),
    a "reconstruct" bytes bar (bytes written, name 'huggingface_hub.snapshot_download') and a "transfer"
    bytes bar (network bytes, name '...transfer', whose total is a guess). Bytes come from the first kind
    of bytes bar only.
    """

    def __init__(self, callback: Callable[[DownloadProgress], None]) -> None:
        self.callback = callback
        self.lock = threading.Lock()
        self.byte_bars: list[_BarState] = []
        self.file_bars: list[_BarState] = []
        self.last: DownloadProgress | None = None
        self.expected_bytes = 0  # a floor for bytes_total: sizes known before the downloads start

    def expect(self, extra_bytes: int) -> None:
        with self.lock:
            total = self.totals()[1]
            self.expected_bytes = max(self.expected_bytes, total) + int(extra_bytes)

    def totals(self) -> tuple[int, int, int, int]:
        return (
            sum(b.n for b in self.byte_bars),
            max(self.expected_bytes, sum(b.total for b in self.byte_bars)),
            sum(b.n for b in self.file_bars),
            sum(b.total for b in self.file_bars),
        )

    def report(self, stage: Literal["download", "done"] = "download") -> None:
        with self.lock:
            done, total, files_done, files_total = self.totals()
            if stage == "done":
                done = total = max(done, total)
                files_done = files_total = max(files_done, files_total)
            event = DownloadProgress(stage, int(done), int(total), None, int(files_done), int(files_total))
            if event == self.last:
                return  # the bars tick more often than the numbers change
            self.last = event
        self.callback(event)

    def tqdm_class(self) -> type:
        """A tqdm subclass bound to this sink (a fresh class per download: no shared state)."""
        sink = self

        class _CallbackTqdm(hf_tqdm):
            def __init__(self, *args, **kwargs) -> None:
                name = kwargs.pop("name", None) or ""
                unit = kwargs.get("unit", "it")
                kwargs["disable"] = True  # no terminal output; the callback reports instead
                super().__init__(*args, **kwargs)
                self._state = _BarState(int(kwargs.get("initial") or 0), int(kwargs.get("total") or 0))
                with sink.lock:
                    if unit == "B" and not name.endswith(".transfer"):
                        sink.byte_bars.append(self._state)
                    elif unit != "B":
                        sink.file_bars.append(self._state)

            def __setattr__(self, key: str, value) -> None:
                super().__setattr__(key, value)
                if key == "total" and "_state" in self.__dict__:
                    self._state.total = int(value or 0)  # snapshot_download grows totals as files start

            def update(self, n: float | None = 1) -> bool | None:
                with sink.lock:
                    self.n += n or 0  # a disabled tqdm does not count by itself; callers read .n
                    self._state.n += int(n or 0)
                sink.report()
                return True

        return _CallbackTqdm


@dataclass
class _BarState:
    n: int = 0
    total: int = 0


# ------------------------------------------------------------------------------------------ resolve


def resolve_model(
    name_or_path: str,
    revision: str | None = None,
    progress: Callable[[DownloadProgress], None] | None = None,
    token: str | None = None,
    *,
    offline: bool | None = None,
    allow_local: bool = True,
) -> Path:
    """A built-in name, a local folder or a Hub id -> the folder holding config.json, tokenizer and *.safetensors.

    Built-in names (backend/loading/builtin.py) are built on first use into the project's cache; one with a
    Hub original (smollm2-135m-instruct) is that Hub id when the Hub answers (and offline mode is off).

    Hub ids download only what the engine reads (see METADATA_PATTERNS, and the weight files). Offline
    (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, or `offline=True`) only the local cache is used. `progress`
    is called from download threads. `allow_local=False` reads every name as a built-in name or a Hub id, never as
    a local folder (a hosted app: a visitor's name must not probe the host's files). Raises ModelNotFoundError,
    GatedModelError, UnsupportedModelError.
    """
    name_or_path = str(name_or_path).strip()
    if not name_or_path:
        raise ModelNotFoundError("no model given: pass a local folder or a Hub id such as 'Qwen/Qwen3-0.6B'")
    offline = offline_mode_enabled() if offline is None else offline
    builtin = find_builtin(name_or_path)  # tiny:<arch>, tiny:trained, smollm2-135m-instruct (loading/builtin.py)
    if builtin is not None:
        if builtin.hub_id is None or offline or not HubConnectivity().reachable():
            folder = resolve_builtin(builtin.name, progress)  # built or converted once into the project's cache
            if progress is not None:
                size = sum(p.stat().st_size for p in safetensors_files(folder))
                progress(DownloadProgress("done", size, size, None))
            return folder
        name_or_path = builtin.hub_id  # the Hub answers: its original checkpoint
    if is_gguf_name(name_or_path):
        raise UnsupportedModelError(f"{name_or_path}: {GGUF_MESSAGE}")
    folder = local_path(name_or_path) if allow_local else None
    if folder is not None:
        check_local_folder(folder)
        if progress is not None:
            size = sum(p.stat().st_size for p in safetensors_files(folder))
            progress(DownloadProgress("done", size, size, None))
        return folder
    return _download(name_or_path, revision, progress, token, offline)


def _download(
    repo_id: str,
    revision: str | None,
    progress: Callable[[DownloadProgress], None] | None,
    token: str | None,
    offline: bool,
) -> Path:
    sink = _ProgressSink(progress) if progress is not None else None
    common = dict(
        token=token, local_files_only=offline, cache_dir=hub_cache_dir(), ignore_patterns=list(IGNORE_PATTERNS)
    )
    with hub_errors(repo_id, revision):
        # 1) small files first: config, tokenizer, the weight index (pins the commit for step 2)
        folder = _snapshot(
            repo_id,
            revision=revision,
            allow_patterns=list(METADATA_PATTERNS),
            tqdm_class=sink.tqdm_class() if sink else None,
            **common,
        )
        commit = folder.name if _is_commit(folder.name) else revision
        tree = _repo_tree(repo_id, commit, token, offline)
        # 2) the weights: exactly the files the index names, else the repository's top-level *.safetensors
        weights = _weight_files(folder, repo_id, tree)
        if sink is not None and tree is not None:
            sink.expect(sum(tree.get(w) or 0 for w in weights if not (folder / w).exists()))
        folder = _snapshot(
            repo_id, revision=commit, allow_patterns=weights, tqdm_class=sink.tqdm_class() if sink else None, **common
        )
    if not any(folder.glob("*.safetensors")):
        raise no_safetensors_error(f"the repository {repo_id}", list(tree or [p.name for p in folder.iterdir()]))
    if not (folder / "config.json").is_file():
        raise UnsupportedModelError(
            f"{repo_id} has no config.json, so it is not a transformers checkpoint this engine can load; "
            "pick the original (transformers) repository of the model"
        )
    missing = [p.name for p in safetensors_files(folder) if not p.is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{repo_id}: weight files {', '.join(missing[:3])} are not in the local cache"
            + (
                " and offline mode is on; go online once to complete the download"
                if offline
                else "; run the download again"
            )
        )
    if sink is not None:
        sink.report("done")
    return folder


def _snapshot(repo_id: str, **kwargs) -> Path:
    """snapshot_download; when the Hub cannot be reached and the cached snapshot lacks some files the patterns
    match (e.g. it was fetched by another tool, with other patterns), the snapshot as it is: the checks
    after the download say whether what the engine needs is there."""
    try:
        return Path(hf.snapshot_download(repo_id, **kwargs))
    except IncompleteSnapshotError as e:
        if not Path(e.snapshot_path).is_dir():
            raise
        logger.info("using the partial cached snapshot of %s: %s", repo_id, e)
        return Path(e.snapshot_path)


def _is_commit(name: str) -> bool:
    return len(name) == 40 and all(c in "0123456789abcdef" for c in name)


def _weight_files(folder: Path, repo_id: str, tree: dict[str, int | None] | None) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_index(index)
        if weight_map:
            return sorted(set(weight_map.values()))
    if tree is None:  # listing unknown (offline without a cached tree): take whatever is cached
        return list(WEIGHT_PATTERNS)
    weights = sorted(f for f in tree if f.endswith(".safetensors") and "/" not in f)
    if not weights:
        raise no_safetensors_error(f"the repository {repo_id}", list(tree))
    return weights


def _repo_tree(repo_id: str, commit: str | None, token: str | None, offline: bool) -> dict[str, int | None] | None:
    """{path: size} of every file of the repository at `commit`, None when unknown.

    huggingface_hub >= 2 caches the listing whenever snapshot_download reached the Hub, so a missing one
    means it did not (offline, or the Hub is down: asking again would only wait through its retries).
    Older versions: ask the API.
    """
    get_cached_tree = getattr(hf, "get_cached_repo_tree", None)
    if get_cached_tree is not None:
        try:
            return {f.path: f.size for f in get_cached_tree(repo_id, revision=commit, cache_dir=hub_cache_dir())}
        except Exception as e:  # noqa: BLE001 - CachedRepoTreeNotFoundError and the like
            logger.debug("no cached tree listing for %s: %s", repo_id, e)
            return None
    if offline:
        return None
    try:
        with hub_errors(repo_id, commit):
            entries = hf.HfApi(token=token).list_repo_tree(repo_id, revision=commit, recursive=True)
            return {e.path: getattr(e, "size", None) for e in entries if isinstance(e, hf.RepoFile)}
    except ModelNotFoundError as e:
        if isinstance(e.__cause__, (_TransportError, OfflineModeIsEnabled)):
            return None  # the Hub went away: work from what is cached
        raise


# ------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class HubModel:
    id: str
    downloads: int = 0
    likes: int = 0
    params: int | None = None  # from the Hub's safetensors summary (total parameters)
    size_bytes: int | None = None  # the weights at their stored dtypes, when the Hub gives per-dtype counts
    gated: bool = False
    library: str | None = None


class SearchResults(list):
    """A list of HubModel that also says whether the Hub was reachable: `offline`, and `error` (a sentence)."""

    def __init__(self, items: Iterable[HubModel] = (), offline: bool = False, error: str | None = None) -> None:
        super().__init__(items)
        self.offline = offline
        self.error = error


SEARCH_EXPAND = ["downloads", "likes", "gated", "library_name", "safetensors", "pipeline_tag"]


def search_models(
    query: str,
    limit: int = 20,
    *,
    token: str | None = None,
    safetensors_only: bool = True,
    connectivity: HubConnectivity | None = None,
) -> SearchResults:
    """Text-generation models whose id matches `query`, most downloaded first.

    Never raises for network trouble: offline mode, an unreachable Hub (one quick probe first, since
    huggingface_hub retries a failed search for ~30 s; pass a `HubConnectivity` you keep to reuse its
    answer) or a failed request give an empty SearchResults with `.offline` / `.error` set.
    """
    if offline_mode_enabled():
        return SearchResults(offline=True, error="offline mode is on (HF_HUB_OFFLINE): Hub search is unavailable")
    connectivity = connectivity or HubConnectivity()
    if not connectivity.reachable():
        return SearchResults(
            offline=True,
            error=f"the Hub ({connectivity.endpoint}) cannot be reached: "
            "search is unavailable; local folders and cached models still work",
        )
    try:
        infos = hf.HfApi(token=token).list_models(
            search=query.strip() or None,
            pipeline_tag="text-generation",
            filter="safetensors" if safetensors_only else None,
            sort="downloads",
            limit=max(1, int(limit)),
            expand=SEARCH_EXPAND,
        )
        models = [_hub_model(info) for info in infos]
    except (_TransportError, OSError) as e:
        offline = not isinstance(e, HfHubHTTPError)
        if offline:
            connectivity.invalidate()
        logger.info("Hub search failed: %s", e)
        return SearchResults(offline=offline, error=f"Hub search failed ({type(e).__name__}): {e}")
    models.sort(key=lambda m: m.downloads, reverse=True)
    return SearchResults(models[:limit])


def _hub_model(info) -> HubModel:
    st = getattr(info, "safetensors", None)
    params = size = None
    if st is not None:
        params = int(st.total) if getattr(st, "total", None) else None
        per_dtype = getattr(st, "parameters", None) or {}
        if per_dtype and all(d in SAFETENSORS_DTYPE_BYTES for d in per_dtype):
            size = int(sum(n * SAFETENSORS_DTYPE_BYTES[d] for d, n in per_dtype.items()))
    return HubModel(
        id=info.id,
        downloads=int(info.downloads or 0),
        likes=int(info.likes or 0),
        params=params,
        size_bytes=size,
        gated=bool(info.gated),
        library=getattr(info, "library_name", None),
    )


# -------------------------------------------------------------------------------------------- cache


def list_cached_models(cache_dir: str | Path | None = None, loadable_only: bool = True) -> list[str]:
    """Repo ids of the model repositories in the local Hub cache, sorted; [] for a missing or empty cache.

    `loadable_only`: only those with a cached snapshot holding config.json and *.safetensors.
    """
    folder = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if not folder.is_dir():
        return []
    try:
        info = hf.scan_cache_dir(folder)
    except (CacheNotFound, OSError) as e:
        logger.info("cannot scan the Hub cache %s: %s", folder, e)
        return []
    ids = set()
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        if loadable_only and not any(_loadable_snapshot(rev.snapshot_path) for rev in repo.revisions):
            continue
        ids.add(repo.repo_id)
    return sorted(ids)


def _loadable_snapshot(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
