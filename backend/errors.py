"""Exceptions the engine raises.

Bad input (a model, a setting, a request) raises an `EngineError`, a ValueError whose message names the value
and what is allowed. A request that was accepted but failed while it ran raises `RequestFailedError` from
`generate()` / `stream()` (a RuntimeError: the cause is in the message); other requests are not affected.
"""

from __future__ import annotations


class EngineError(ValueError):
    """Base class: user-facing problems (bad model, bad settings, bad request). `param` names the option or
    request field whose value was refused, when one was (a face maps it to its own name, e.g. an API field)."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # pickles with its param (errors cross process boundaries in backend/distributed)
        return (type(self), (str(self), self.param))


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


class RequestFailedError(RuntimeError):
    """An accepted request failed while it ran (its sampling, its stop handling, a model step, or the engine
    stopping). Only that request failed: the engine keeps serving. `request_id` names it."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
