"""The one error type of the hosting checks: what a visitor is refused, with the message they see."""

from __future__ import annotations

from backend.core.errors import EngineError


class HostingError(EngineError):
    """Refused by the host's policy (a path outside the allowed folders, remote code, a cap, the memory, the key).
    The message is shown to the visitor as it is: it never names a host path or says whether one exists."""
