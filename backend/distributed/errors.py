"""Errors of the tensor-parallel group while it runs (refusals at load: backend.core.errors' UnsupportedModelError)."""

from __future__ import annotations


class TensorParallelError(RuntimeError):
    """A rank of the group died, failed or stopped answering; the group is shut down and every later step fails."""
