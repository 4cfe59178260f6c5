"""Map engine and memory errors to gr.Error with what to do; the app keeps running after any of them."""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

logger = logging.getLogger(__name__)

OOM_HINT = (
    "Out of memory{where}. Lower the KV cache budget or max batch, pick int8/int4 quantization or a "
    "smaller dtype, run fewer parallel requests, or choose a smaller model. The previous engine was "
    "closed; press Load to try again."
)


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def to_gr_error(exc: BaseException, where: str = "") -> gr.Error:
    """The user-facing error for an exception raised by a callback."""
    from backend.errors import EngineError

    if isinstance(exc, gr.Error):
        return exc
    if is_oom(exc):
        return gr.Error(OOM_HINT.format(where=f" while {where}" if where else ""), title="Out of memory")
    if isinstance(exc, EngineError):
        return gr.Error(str(exc), title=type(exc).__name__)
    logger.exception("unexpected error in the UI", exc_info=exc)
    return gr.Error(
        f"{type(exc).__name__}: {exc}. The app is still running; see the server log for details.",
        title="Unexpected error",
    )


def user_errors(where: str = ""):
    """Decorator for callbacks (plain or generator): raise gr.Error instead of crashing the event."""

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    raise to_gr_error(e, where) from e

            return gen

        @functools.wraps(fn)
        def plain(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise to_gr_error(e, where) from e

        return plain

    return wrap
