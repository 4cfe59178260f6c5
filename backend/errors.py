"""Exceptions the engine raises for bad input. All are ValueErrors with a message that says what to do."""

from __future__ import annotations


class EngineError(ValueError):
    """Base class: user-facing problems (bad model, bad settings, bad request)."""


class ModelNotFoundError(EngineError):
    """A local path that does not exist or a Hub id that cannot be resolved."""


class GatedModelError(EngineError):
    """A Hub repository that needs accepted terms or a token."""


class UnsupportedModelError(EngineError):
    """An architecture or checkpoint format the engine cannot run (with the reason)."""


class QuantizationError(EngineError):
    """A quantization method that is unknown or unavailable on this device/checkpoint."""


class RequestError(EngineError):
    """A bad request: empty prompt, prompt longer than the context, invalid sampling values."""


class KVCacheError(EngineError):
    """The KV cache budget cannot hold what was asked for."""
