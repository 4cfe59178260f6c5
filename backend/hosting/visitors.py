"""Per-visitor counters the faces keep (one instance per app or server; thread-safe): sequences a visitor runs at
once, and which visitors hold a model of their own. A visitor is whatever id the face has: the Gradio session
hash, the API key, the client address."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from backend.hosting.errors import HostingError
from backend.hosting.policy import HostPolicy


@dataclass
class VisitorLimiter:
    """At most `policy.max_parallel_per_visitor` sequences per visitor at once (a request with n choices is n)."""

    policy: HostPolicy
    _running: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @contextmanager
    def running(self, visitor: str, sequences: int = 1) -> Iterator[None]:
        """Hold `sequences` of `visitor`'s slots for the block; raises HostingError when that would be over the cap."""
        self.acquire(visitor, sequences)
        try:
            yield
        finally:
            self.release(visitor, sequences)

    def acquire(self, visitor: str, sequences: int = 1) -> None:
        cap = self.policy.max_parallel_per_visitor
        with self._lock:
            now = self._running.get(visitor, 0)
            if cap is not None and now + sequences > cap:
                if sequences > cap:
                    raise HostingError(
                        f"this request runs {sequences} sequences at once and this host allows at most {cap} per "
                        f"visitor: ask for at most {cap}"
                    )
                raise HostingError(
                    f"you already have {now} sequence(s) running and this host allows {cap} per visitor at once: "
                    "wait for them to finish"
                )
            self._running[visitor] = now + sequences

    def release(self, visitor: str, sequences: int = 1) -> None:
        with self._lock:
            left = self._running.get(visitor, 0) - sequences
            if left > 0:
                self._running[visitor] = left
            else:
                self._running.pop(visitor, None)

    def in_use(self, visitor: str) -> int:
        with self._lock:
            return self._running.get(visitor, 0)


@dataclass
class ModelSlots:
    """At most `policy.max_visitor_models` visitors hold a model they loaded themselves; the others use the
    host's. `claim` before loading, `release` when the visitor's model is closed (or the session ends)."""

    policy: HostPolicy
    _holders: set[str] = field(default_factory=set, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def claim(self, visitor: str) -> None:
        cap = self.policy.max_visitor_models
        with self._lock:
            if visitor in self._holders or cap is None:
                self._holders.add(visitor)
                return
            if cap == 0:
                raise HostingError("this host does not let visitors load their own model: use the host's model")
            if len(self._holders) >= cap:
                raise HostingError(
                    f"this host lets {cap} visitor(s) load their own model at a time and all are in use: use the "
                    "host's model, or try again later"
                )
            self._holders.add(visitor)

    def release(self, visitor: str) -> None:
        with self._lock:
            self._holders.discard(visitor)

    def holders(self) -> int:
        with self._lock:
            return len(self._holders)
