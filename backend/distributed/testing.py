"""Build an Engine on a tensor-parallel group without the engine knowing about tensor parallelism (until
EngineConfig has `tp_size`): rank 0's load and the runner are swapped in while Engine.__init__ runs.

    engine = make_tp_engine(path, tp_size=2, model_impl="native", dtype="float32")
    group = TensorParallelGroup.start(TPOptions(2)); engine = make_tp_engine(path, group=group, ...)  # shared
"""

from __future__ import annotations

from unittest import mock

import backend.engine as engine_module
from backend.distributed.group import TensorParallelGroup, TPOptions
from backend.distributed.runner import DistributedRunner
from backend.engine import Engine


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

    def load(cfg, progress=None):
        return group.load(cfg, progress)

    def runner(*args, **kwargs):
        return DistributedRunner(group, *args, owns_group=owns, **kwargs)

    try:
        with (
            mock.patch.object(engine_module, "load_model", load),
            mock.patch.object(engine_module, "ModelRunner", runner),
        ):
            return Engine(model, **engine_options)
    except BaseException:
        if owns:
            group.shutdown()
        else:
            group.unload()
        raise
