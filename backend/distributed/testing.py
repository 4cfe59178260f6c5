"""Build an Engine on a tensor-parallel group of the caller's (shared by several engines, e.g. the tests') or a
group of its own with other options than the engine's default (benchmarks: threads per rank):

    engine = make_tp_engine(path, tp_size=2, model_impl="native", dtype="float32")
    group = TensorParallelGroup.start(TPOptions(2)); engine = make_tp_engine(path, group=group, ...)  # shared
"""

from __future__ import annotations

from backend.core.engine import Engine
from backend.distributed.group import TensorParallelGroup, TPOptions


def make_tp_engine(
    model: str,
    tp_size: int = 2,
    group: TensorParallelGroup | None = None,
    tp_options: TPOptions | None = None,
    **engine_options,
) -> Engine:
    """An Engine whose model runs over `group` (a new group of `tp_size` ranks, shut down by engine.close(),
    when None; a given group is only unloaded by close() and stays up for the next engine)."""
    owns = group is None
    if owns:
        device = engine_options.get("device", "cpu")
        group = TensorParallelGroup.start(
            tp_options or TPOptions(tp_size), "cuda" if device.startswith("cuda") else "cpu"
        )
    try:
        return Engine(model, tp_group=group, own_tp_group=owns, **engine_options)
    except BaseException:
        if owns:
            group.shutdown()
        else:
            group.unload()
        raise
