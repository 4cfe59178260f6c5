"""Map engine and memory errors to gr.Error with what to do; the app keeps running after any of them.

Expected user errors (bad input, a model that cannot load, no model loaded) are logged as one line and
never print a traceback (gr.Error(print_exception=False)); only unexpected errors log their traceback.
Callbacks whose outputs include a status line use `status_errors`: the error goes into that status line
and a warning toast, so no output gets an "Error" badge.
"""

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


def _quiet(err: gr.Error) -> gr.Error:
    err.print_exception = False  # gradio's queue prints a traceback for gr.Error unless told not to
    return err


def to_gr_error(exc: BaseException, where: str = "") -> gr.Error:
    """The user-facing error for an exception raised by a callback; expected errors are logged as one line."""
    from backend.core.errors import EngineError

    doing = f" while {where}" if where else ""
    if isinstance(exc, gr.Error):
        logger.warning("user error%s: %s: %s", doing, exc.title or "Error", exc.message)
        return _quiet(exc)
    if is_oom(exc):
        logger.warning("out of memory%s: %s", doing, exc)
        return _quiet(gr.Error(OOM_HINT.format(where=doing), title="Out of memory"))
    if isinstance(exc, EngineError):
        logger.warning("user error%s: %s: %s", doing, type(exc).__name__, exc)
        return _quiet(gr.Error(str(exc), title=type(exc).__name__))
    logger.exception("unexpected error in the UI%s", doing, exc_info=exc)
    return _quiet(
        gr.Error(
            f"{type(exc).__name__}: {exc}. The app is still running; see the server log for details.",
            title="Unexpected error",
        )
    )


def error_status(err: gr.Error) -> str:
    """The markdown a status line shows for an error."""
    return f"**{err.title or 'Error'}**: {err.message}"


def user_errors(where: str = ""):
    """Decorator for callbacks (plain or generator): raise gr.Error instead of crashing the event."""

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:
                    raise to_gr_error(e, where) from None

            return gen

        @functools.wraps(fn)
        def plain(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise to_gr_error(e, where) from None

        return plain

    return wrap


def status_errors(where: str, outputs: int, status: int = 0):
    """Decorator for generator callbacks with `outputs` outputs, one of them (index `status`) a status line:
    an error becomes that line plus a warning toast; the other outputs keep what they show (gr.skip())."""

    def wrap(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:
                err = to_gr_error(e, where)
                gr.Warning(err.message, title=err.title or "Error")
                update = [gr.skip()] * outputs
                update[status] = error_status(err)
                yield tuple(update)

        return gen

    return wrap
