"""Whether the engine can serve: what /health answers and what the launcher's watchdog reads.

An engine cannot serve when it is closed (the server is shutting down, or the app is swapping models) or when
its tensor-parallel group is down (a rank died or failed: the group never recovers, every step would fail).
The second is `fatal_problem`: only a new process fixes it, so `launch_server` exits non-zero on it and a
supervisor (systemd, Kubernetes, a Space) restarts the server.
"""

from __future__ import annotations


def fatal_problem(engine) -> str | None:
    """Why `engine` can never serve again in this process (its tensor-parallel group is down); None otherwise."""
    group = getattr(engine, "tp_group", None) if engine is not None else None
    return group.problem() if group is not None else None


def serving_problem(engine) -> str | None:
    """Why `engine` cannot serve a request now (none loaded, closed, its tensor-parallel group down); None when
    it can."""
    if engine is None:
        return "no model is loaded"
    if engine.closed:
        return "the engine is closed (the server is shutting down)"
    return fatal_problem(engine)
