"""Exceptions the engine raises.

Bad input (a model, a setting, a request) raises an `EngineError`, a ValueError whose message names the value
and what is allowed. A request that was accepted but failed while it ran raises `RequestFailedError` from
`generate()` / `stream()` (a RuntimeError: the cause is in the message); other requests are not affected.
"""

from __future__ import annotations

# The one answer to a GGUF checkpoint: the engine runs safetensors only (names the convert command).
GGUF_MESSAGE = (
    "GGUF is not supported; use a safetensors checkpoint: convert the GGUF file once with "
    "`python -m backend.tools.convert_gguf IN.gguf OUT_DIR --dtype bfloat16` and load OUT_DIR "
    "(or use the original repository)"
)


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


class ContextLengthError(RequestError):
    """A prompt that leaves no room in the context for one new token: `prompt_tokens` of `max_model_len`."""

    def __init__(self, message: str, prompt_tokens: int = 0, max_model_len: int = 0) -> None:
        super().__init__(message, param="prompt")
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len

    def __reduce__(self):
        return (type(self), (str(self), self.prompt_tokens, self.max_model_len))


class CacheDirError(EngineError):
    """The project's cache folder (backend/paths.py, FLAB_CACHE_DIR) cannot be written: read-only, full, not a
    folder. The message names the folder and the variable that moves it."""


class KVCacheError(EngineError):
    """The KV cache budget cannot hold what was asked for."""


class RequestFailedError(RuntimeError):
    """An accepted request failed while it ran (its sampling, its stop handling, a model step, or the engine
    stopping). Only that request failed: the engine keeps serving. `request_id` names it."""

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
