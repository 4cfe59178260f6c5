"""Following a workload in flight (ui/workload.py's Workload or ui/endpoint.py's EndpointWorkload): started as
part of a run that Stop can end, and polled for live updates. Generate and Compare, engine and endpoint alike."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ui.plots import Series
from ui.session import RunHandle


@contextmanager
def started(wl, handle: RunHandle) -> Iterator[None]:
    """Start `wl` as part of `handle`'s run (Stop stops it); on leaving the block (its end, an error, the page went
    away) it is stopped if it has not finished."""
    wl.start()
    handle.stoppers.append(wl.stop)
    try:
        yield
    finally:
        if not wl.done:
            wl.stop()
        handle.stoppers.remove(wl.stop)


def updates(wl, every_s: float) -> Iterator[tuple[bool, list, Series]]:
    """(finished, results, series) every `every_s` seconds until `wl` has finished (that last update included)."""
    while True:
        finished = wl.wait(every_s)
        results, series = wl.snapshot()
        yield finished, results, series
        if finished:
            return
