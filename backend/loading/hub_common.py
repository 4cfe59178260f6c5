"""Shared Hub plumbing for hub.py and memory.py: offline detection, cache folder, local folder checks,
and the translation of huggingface_hub errors into the engine's errors (each says what to do)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from backend.core.errors import GGUF_MESSAGE, GatedModelError, ModelNotFoundError, UnsupportedModelError
from backend.models.checkpoint import read_index

try:  # huggingface_hub >= 2 talks through httpx2, 1.x through httpx
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import TransportError as _TransportError

# Bytes per element of each safetensors dtype (https://huggingface.co/docs/safetensors).
SAFETENSORS_DTYPE_BYTES: dict[str, float] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "F4": 0.5,
    "U4": 0.5,
    "I4": 0.5,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


# ----------------------------------------------------------------------------------------- offline


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in constants.ENV_VARS_TRUE_VALUES


def offline_mode_enabled() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now and as huggingface_hub read it at import (it honours
    its import-time value, so a later change of the environment alone does not bring it back online)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def probe_endpoint(endpoint: str, timeout_s: float) -> bool:
    """One HEAD request to the Hub endpoint: True when any HTTP answer comes back (even an error status)."""
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):  # URLError, timeouts, refused connections, bad URLs
        return False


@dataclass
class HubConnectivity:
    """Whether the Hub endpoint answers, probed at most once per `ttl_s`.

    Keep one instance where the answer is needed (a UI session, a CLI run): the cache lives in the
    instance, not in the module. `probe(endpoint, timeout_s) -> bool` can be swapped (tests, proxies).
    """

    endpoint: str = field(default_factory=lambda: constants.ENDPOINT)
    timeout_s: float = 2.0
    ttl_s: float = 60.0
    probe: Callable[[str, float], bool] = probe_endpoint
    _reachable: bool | None = field(default=None, init=False, repr=False)
    _checked_at: float = field(default=0.0, init=False, repr=False)

    def reachable(self) -> bool:
        now = time.monotonic()
        if self._reachable is None or now - self._checked_at > self.ttl_s:
            self._reachable = bool(self.probe(self.endpoint, self.timeout_s))
            self._checked_at = now
        return self._reachable

    def invalidate(self) -> None:
        self._reachable = None


def is_offline(connectivity: HubConnectivity | None = None) -> bool:
    """True when offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or the Hub does not answer.

    Without `connectivity` every call probes (up to its timeout); pass a `HubConnectivity` you keep to
    reuse the answer.
    """
    if offline_mode_enabled():
        return True
    return not (connectivity or HubConnectivity()).reachable()


def hub_cache_dir() -> Path:
    """The Hub cache folder, from the environment as it is now (HF_HUB_CACHE, else HF_HOME/hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


# ------------------------------------------------------------------------------------ local folders


def is_gguf_name(name: str) -> bool:
    return name.lower().endswith(".gguf")


def local_path(name_or_path: str) -> Path | None:
    """The local folder meant by `name_or_path`, None when it reads as a Hub id.

    An existing path wins over a Hub id of the same spelling. A missing path that cannot be a Hub id
    (absolute, ./ ../ ~, backslashes, more than one '/') raises ModelNotFoundError.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(
                f"{path} is a file; pass the folder that holds config.json and the *.safetensors weights"
            )
        return path
    looks_like_path = (
        path.is_absolute() or name_or_path.startswith((".", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1
    )
    if looks_like_path:
        raise ModelNotFoundError(
            f"no folder at {path}: pass an existing folder with config.json and *.safetensors weights, "
            "or a Hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    return None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files the loader reads: those named by model.safetensors.index.json, else *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        # a garbage index names itself, says download again
        return [folder / name for name in sorted(set(read_index(index).values()))]
    return sorted(folder.glob("*.safetensors"))


def no_safetensors_error(where: str, files: list[str]) -> UnsupportedModelError:
    """GGUF-only -> the GGUF message; otherwise say which formats are there and what to do."""
    if any(is_gguf_name(f) for f in files):
        return UnsupportedModelError(f"{where} holds GGUF weights only. {GGUF_MESSAGE}")
    formats = sorted(
        {
            Path(f).suffix
            for f in files
            if Path(f).suffix in (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")
        }
    )
    found = f" (it has {', '.join(formats)} files)" if formats else ""
    return UnsupportedModelError(
        f"{where} has no *.safetensors weights{found}; only safetensors checkpoints are loaded. Pick a "
        "repository that ships model.safetensors, or convert with "
        "`AutoModelForCausalLM.from_pretrained(...).save_pretrained(folder, safe_serialization=True)`"
    )


def check_local_folder(folder: Path) -> None:
    """Raise unless `folder` holds config.json and safetensors weights (GGUF-only folders are refused)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    has_weights = any(n.endswith(".safetensors") for n in names)
    if not has_weights and any(is_gguf_name(n) for n in names):
        raise no_safetensors_error(str(folder), names)
    if "config.json" not in names:
        raise ModelNotFoundError(
            f"{folder} has no config.json; a model folder needs config.json, *.safetensors weights and the "
            "tokenizer files (as written by save_pretrained, or fetched with `hf download <repo id>`)"
        )
    if not has_weights:
        raise no_safetensors_error(str(folder), names)
    missing = [p.name for p in safetensors_files(folder) if not p.is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{folder}: model.safetensors.index.json names weight files that are missing: {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; download them again"
        )


# -------------------------------------------------------------------------------------- hub errors


def offline_help(repo_id: str) -> str:
    cache = hub_cache_dir()
    return (
        f"To get it: (1) connect to the internet and unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE; "
        f"(2) or, on a machine with internet, run `hf download {repo_id}` and copy its cache into {cache} "
        "(or point HF_HUB_CACHE at a copied cache); (3) or pass a local folder that holds config.json, "
        "*.safetensors weights and the tokenizer files."
    )


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub / network errors raised inside the block into the engine's errors."""
    rev = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except GatedRepoError as e:  # before RepositoryNotFoundError: it subclasses it
        raise GatedModelError(
            f"{repo_id} is gated: accept the terms at https://huggingface.co/{repo_id} and set HF_TOKEN "
            "(or run `hf auth login`) with a token of the account that accepted them"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id} has no revision {revision!r}: check the branch, tag or commit") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFoundError(
            f"no model {repo_id!r} on the Hub (or it is private) and no local folder of that name: check the id "
            "or log in "
            "(set HF_TOKEN or run `hf auth login`)"
        ) from e
    except DisabledRepoError as e:
        raise ModelNotFoundError(f"{repo_id} has been disabled on the Hub; pick another repository") from e
    except HFValidationError as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hub id ('owner/name'): check the id "
            "or the path"
        ) from e
    except IncompleteSnapshotError as e:
        raise ModelNotFoundError(
            f"{repo_id}{rev} is only partly in the local cache and the Hub cannot be reached. {offline_help(repo_id)}"
        ) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, _TransportError) as e:
        why = (
            "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
            if offline_mode_enabled()
            else f"the Hub cannot be reached ({type(e).__name__})"
        )
        raise ModelNotFoundError(
            f"{repo_id}{rev} is not in the local cache ({hub_cache_dir()}) and {why}. {offline_help(repo_id)}"
        ) from e
    except RemoteEntryNotFoundError as e:
        raise ModelNotFoundError(f"{repo_id}{rev}: a file is missing from the repository ({e})") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise ModelNotFoundError(
                f"the Hub refused access to {repo_id} (HTTP {status}): check the id or log in "
                "(set HF_TOKEN or run `hf auth login`)"
            ) from e
        raise ModelNotFoundError(f"the Hub request for {repo_id} failed (HTTP {status}): try again later ({e})") from e
