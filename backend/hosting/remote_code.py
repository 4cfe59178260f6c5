"""Remote code (a checkpoint's own Python, run by `trust_remote_code`) is the host's decision, never a visitor's.

`check_remote_code(name, requested, policy)` -> a `RemoteCodeDecision`: `trust` is what to pass to Engine. It is
True only when the model needs remote code (its config.json has `auto_map`) and the host allowed it (and the
repository is in the host's list, when there is one); what the visitor asked (`requested`) never changes it.
A model that needs remote code the host did not allow is refused here, with the reason, before any weights
are downloaded: for a Hub id only config.json is fetched (or read from the Hub cache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from backend.core.errors import ModelNotFoundError, UnsupportedModelError
from backend.hosting.errors import HostingError
from backend.hosting.paths import is_hub_id
from backend.hosting.policy import HostPolicy

IGNORED_REQUEST = "remote code is the host's decision: the request's trust_remote_code was ignored"


@dataclass(frozen=True)
class RemoteCodeDecision:
    trust: bool  # pass as Engine(trust_remote_code=...)
    needs: bool  # the model ships its own code (config.json auto_map)
    message: str  # one line for the visitor (the UI shows it next to the model picker)


def remote_code_status(policy: HostPolicy) -> str:
    """What the app shows in place of a trust_remote_code checkbox."""
    if not policy.allow_remote_code:
        return "Remote code: not allowed by the host (models that ship their own Python code are refused)."
    if policy.remote_code_repos:
        return f"Remote code: the host allows it for {', '.join(policy.remote_code_repos)} only."
    return "Remote code: the host allows it; the code comes from the model's repository and runs on this machine."


def check_remote_code(
    name: str, requested: bool, policy: HostPolicy, *, revision: str | None = None, token: str | None = None
) -> RemoteCodeDecision:
    """Decide trust_remote_code for loading `name` (a name that passed check_model_name). Raises HostingError
    when the model needs remote code the host has not allowed; ModelNotFoundError / GatedModelError when its
    config cannot be read (the same errors loading would give)."""
    name = str(name).strip()
    needs = needs_remote_code(name, revision=revision, token=token)
    note = f" ({IGNORED_REQUEST})" if requested and not needs else ""
    if not needs:
        return RemoteCodeDecision(False, False, f"{name} runs without remote code{note}")
    if not policy.allow_remote_code:
        raise HostingError(
            f"{name} needs remote code (it ships its own Python code in its repository) and the host has not "
            "allowed remote code on this host; pick another model"
        )
    if policy.remote_code_repos is not None and not _listed(name, policy.remote_code_repos):
        raise HostingError(
            f"{name} needs remote code and the host allows remote code only for "
            f"{', '.join(policy.remote_code_repos)}; pick one of those or another model"
        )
    return RemoteCodeDecision(
        True, True, f"{name} runs its own code from its repository: the host has allowed remote code for it"
    )


def needs_remote_code(name: str, *, revision: str | None = None, token: str | None = None) -> bool:
    """True when the model's config.json declares `auto_map` (classes to import from the checkpoint's files)."""
    from backend.loading.builtin import find_builtin

    builtin = find_builtin(name)
    if builtin is not None:  # the project's own models; smollm2-135m-instruct's Hub original has no custom code
        return False
    folder = Path(name).expanduser()
    if folder.is_dir():
        config = folder / "config.json"
        return _declares_auto_map(config) if config.is_file() else False  # the loader says what is missing
    if not is_hub_id(name):
        raise ModelNotFoundError(f"no folder at {name} and it is not a Hub id")
    return _declares_auto_map(_hub_config(name, revision, token))


def _hub_config(repo_id: str, revision: str | None, token: str | None) -> Path:
    """config.json of `repo_id` from the Hub cache, else downloaded alone (no weights); offline: cache only."""
    import huggingface_hub as hf
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from backend.loading.hub_common import hub_cache_dir, hub_errors, offline_mode_enabled

    with hub_errors(repo_id, revision):
        try:
            return Path(
                hf.hf_hub_download(
                    repo_id,
                    "config.json",
                    revision=revision,
                    token=token,
                    cache_dir=hub_cache_dir(),
                    local_files_only=offline_mode_enabled(),
                )
            )
        except RemoteEntryNotFoundError:
            raise UnsupportedModelError(
                f"{repo_id} has no config.json, so it is not a transformers checkpoint this engine can load; "
                "pick the original (transformers) repository of the model"
            ) from None


def _declares_auto_map(config: Path) -> bool:
    try:
        data = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # the loader refuses a corrupt config.json with its own message
    if not isinstance(data, dict):
        return False
    text = data.get("text_config")
    return bool(data.get("auto_map")) or (isinstance(text, dict) and bool(text.get("auto_map")))


def _listed(name: str, repos: tuple[str, ...]) -> bool:
    wanted = name.casefold()
    for repo in repos:
        if repo.casefold() == wanted:
            return True
        local = Path(repo).expanduser()
        if not is_hub_id(repo) and Path(name).is_dir() and local.resolve() == Path(name).expanduser().resolve():
            return True
    return False
