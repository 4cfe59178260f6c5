"""Which model names a visitor may load on a hosted app: Hub ids, built-in names, folders under the allowed dirs.

A Hub id is `name` or `org/name` as the Hub spells them (letters, digits, `-`, `_`, `.`; at most 96
characters; not starting with `/`, `.` or `~`). Everything else is a path. A path is resolved (symlinks and
`..` followed, `~` expanded, relative to the working folder) and loads only when the result is inside an
allowed folder (itself resolved). Every other path gets one message, whether it exists or not.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from backend.hosting.errors import HostingError
from backend.hosting.policy import HostPolicy

PATH_REFUSED = "local folders are not allowed on this host; pick a Hub id or a folder under the host's model folders"


def is_hub_id(name: str) -> bool:
    """True when `name` reads as a Hub repository id (`name` or `org/name`), not as a path."""
    name = str(name).strip()
    if not name or name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or ":" in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_name(name: str, policy: HostPolicy) -> str:
    """The name to load: `name` itself for Hub ids and built-in names (and for anything when not hosted), the
    resolved folder for an allowed local path. Raises HostingError(PATH_REFUSED) for any other path, the same
    message whether the path exists or not."""
    name = str(name).strip()
    if not policy.hosted or not name:
        return name
    from backend.loading.builtin import find_builtin

    if find_builtin(name) is not None:  # an unknown tiny:<x> raises ModelNotFoundError listing the built-ins
        return name
    if is_hub_id(name):  # a Hub id even where a folder of that spelling exists: load it with allow_local_paths=False
        return name
    target = _resolve(Path(name).expanduser())
    if target is not None and any(target.is_relative_to(d) for d in _allowed(policy)):
        return str(target)
    raise HostingError(PATH_REFUSED)


def _allowed(policy: HostPolicy) -> list[Path]:
    dirs = []
    for d in policy.allowed_dirs:
        resolved = _resolve(Path(d).expanduser())
        if resolved is not None:
            dirs.append(resolved)
    return dirs


def _resolve(path: Path) -> Path | None:
    """`path` with symlinks and `..` resolved (strict=False: a missing tail stays as written); None when it cannot
    be resolved (a symlink loop, an unreadable parent), which the caller refuses like any outside path."""
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError):
        return None


def hosted_load_options(name: str, policy: HostPolicy) -> dict:
    """Engine options for a visitor's model name: `model`, and `allow_local_paths=False` for a Hub id or a built-in
    name when hosted (so an existing folder of the same spelling is never read). Raises like check_model_name."""
    model = check_model_name(name, policy)
    # when hosted, check_model_name returns an allowed folder as its resolved (absolute) path
    return dict(model=model, allow_local_paths=not policy.hosted or Path(model).is_absolute())
