"""The engine cache: one engine per process, reused while its settings do not change, guarded by a lock.

Loading with the same settings returns the engine already loaded; loading with different settings closes
the old engine first (its memory is freed before the new weights arrive), then builds the new one.
Also keeps track of the runs in flight per browser session so that Stop can cancel them.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSpec:
    """What to load: the model and the engine options (EngineConfig's names; an option not set keeps the engine's
    default, the five below are filled from EngineConfig's defaults)."""

    model: str  # a local folder or a Hub id (already resolved from the picker)
    model_impl: str
    quantization: str | None
    dtype: str
    device: str
    trust_remote_code: bool
    options: tuple[tuple[str, Any], ...] = ()  # the other engine options (block_size, kv_cache_memory_gb, ...), sorted

    @classmethod
    def make(cls, model: str, **options) -> "LoadSpec":
        """From EngineConfig options by name (None: the engine's default)."""
        from backend.core.config import EngineConfig

        named = {n: options.pop(n, None) for n in NAMED}
        named = {n: EngineConfig.default(n) if v is None else v for n, v in named.items()}
        opts = tuple(sorted((k, v) for k, v in options.items() if v is not None))
        return cls(model, **named, options=opts)

    def with_options(self, **options) -> "LoadSpec":
        """The same spec with these engine options set (None: removed)."""
        return LoadSpec.make(self.model, **(self.engine_kwargs() | options))

    def engine_kwargs(self) -> dict:
        return dict(
            model_impl=self.model_impl,
            quantization=self.quantization,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            **dict(self.options),
        )


NAMED = ("model_impl", "quantization", "dtype", "device", "trust_remote_code")  # LoadSpec's own fields


def _default_factory(model: str, **kwargs):
    from backend import Engine

    return Engine(model, **kwargs)


class Session:
    """Holds at most one engine. Thread-safe."""

    def __init__(self, engine_factory: Callable[..., Any] | None = None) -> None:
        self._factory = engine_factory or _default_factory
        self._lock = threading.RLock()
        self.engine = None
        self.spec: LoadSpec | None = None
        self.load_seconds = 0.0
        self.restored: LoadSpec | None = None  # set when the last load failed and the previous engine came back

    def load(self, spec: LoadSpec, progress: Callable | None = None) -> tuple[Any, bool]:
        """Return (engine, reused). Closes the current engine when the settings differ (its memory is freed
        before the new weights arrive). When the new engine fails to build, the previous settings are loaded
        again (`restored` is then their spec) before the error propagates: a failed load never leaves the
        lab without the engine it had."""
        with self._lock:
            self.restored = None
            if self.engine is not None and self.spec == spec:
                return self.engine, True
            previous = self.spec
            self._close_locked()
            try:
                return self._build(spec, progress), False
            except BaseException:
                if previous is not None:
                    try:
                        self._build(previous, None)
                        self.restored = previous
                    except Exception as again:  # the old settings fail now too: no engine, say why in the log
                        logger.warning("could not load the previous engine again: %s: %s", type(again).__name__, again)
                raise

    def _build(self, spec: LoadSpec, progress: Callable | None):
        start = time.perf_counter()
        engine = self._factory(spec.model, progress=progress, **spec.engine_kwargs())
        self.engine, self.spec, self.load_seconds = engine, spec, time.perf_counter() - start
        return engine

    def build_apart(self, spec: LoadSpec, progress: Callable | None = None):
        """An engine of `spec` beside the one the session holds (Compare's second side, so both sides stay loaded
        and alternate): the session neither keeps nor reuses it, the caller closes it."""
        return self._factory(spec.model, progress=progress, **spec.engine_kwargs())

    def load_if_empty(self, spec: LoadSpec, progress: Callable | None = None) -> tuple[Any, bool]:
        """Load `spec` only when no engine is loaded (after any load in progress); else keep the current one."""
        with self._lock:
            if self.engine is not None:
                return self.engine, True
            return self.load(spec, progress)

    def current(self, wait: float = 0.0):
        """The loaded engine (or None). With `wait`, first wait up to that many seconds for a load in progress."""
        if wait > 0 and self._lock.acquire(timeout=wait):
            self._lock.release()
        return self.engine

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        engine, self.engine, self.spec = self.engine, None, None
        if engine is not None:
            try:
                engine.close()
            finally:
                del engine
                gc.collect()
                try:
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                except Exception:  # pragma: no cover - freeing is best effort
                    pass


@dataclass
class RunHandle:
    cancel: threading.Event = field(default_factory=threading.Event)
    stoppers: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        self.cancel.set()
        for fn in list(self.stoppers):
            fn()


class Runs:
    """Runs in flight per browser session (key = gradio's session hash), so Stop cancels only your own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, list[RunHandle]] = {}

    def start(self, key: str) -> RunHandle:
        handle = RunHandle()
        with self._lock:
            self._runs.setdefault(key, []).append(handle)
        return handle

    def finish(self, key: str, handle: RunHandle) -> None:
        with self._lock:
            runs = self._runs.get(key, [])
            if handle in runs:
                runs.remove(handle)
            if not runs:
                self._runs.pop(key, None)

    def stop(self, key: str) -> int:
        with self._lock:
            handles = list(self._runs.get(key, []))
        for h in handles:
            h.stop()
        return len(handles)

    def active_elsewhere(self, key: str) -> int:
        """Runs in flight for other browser sessions (they use the one shared engine)."""
        with self._lock:
            return sum(len(handles) for k, handles in self._runs.items() if k != key)
