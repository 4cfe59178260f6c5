"""What rank 0 sends the workers: one command per key of the group's store, `cmd/<n>` (a pickled `Command`).

Once per step the command carries the step's metadata: rank 0's ForwardBatch without its KV cache (every rank
has its own cache tensors, for its own heads, under the same block ids). Workers rebuild the ForwardBatch on
their cache and run their shard. Setup commands (load, probe, kv, unload) are answered under `reply/<n>/<rank>`;
a worker whose step fails writes `error/<rank>` and exits, which makes its peers' collectives fail at once.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from backend.core.kv_cache import KVCache, KVCacheSpec

LOAD, PROBE, KV, STEP, UNLOAD, SHUTDOWN = "load", "probe", "kv", "step", "unload", "shutdown"


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes):
    return pickle.loads(data)


@dataclass
class Command:
    kind: str
    payload: object = None


@dataclass
class Reply:
    ok: bool
    value: object = None
    error: str = ""


@dataclass
class KVRequest:
    """Allocate the rank's KV cache: the same layout (kv heads per rank are equal on every rank) and block count."""

    spec: KVCacheSpec
    num_blocks: int


@dataclass
class StepMeta:
    """A ForwardBatch's fields but the KV cache (`kv_fields` names those), tensors on the CPU."""

    fields: dict
    kv_fields: tuple[str, ...]
    batch_type: type

    @classmethod
    def of(cls, fb) -> "StepMeta":
        kept, kv = {}, []
        for f in dataclasses.fields(fb):
            value = getattr(fb, f.name)
            if isinstance(value, KVCache):
                kv.append(f.name)
            else:
                kept[f.name] = convert(value, _to_wire)
        return cls(kept, tuple(kv), type(fb))

    def forward_batch(self, kv_cache: KVCache, device: torch.device):
        fields = {k: convert(v, lambda t: _from_wire(t, device)) for k, v in self.fields.items()}
        return self.batch_type(**fields, **{name: kv_cache for name in self.kv_fields})


@dataclass
class _Array:
    """A tensor on the wire as a numpy array (pickles in microseconds; a torch tensor takes a millisecond)."""

    array: np.ndarray


def _to_wire(t: torch.Tensor):
    t = t.detach().cpu()
    try:
        return _Array(t.numpy())
    except TypeError:  # a dtype numpy lacks (bfloat16): the tensor itself
        return t


def _from_wire(value, device: torch.device):
    t = torch.from_numpy(value.array) if isinstance(value, _Array) else value
    return t if t.device == device else t.to(device)


def convert(value, fn):
    """`value` with `fn` applied to every tensor (or wire array) in it: dataclasses, lists, tuples, dicts."""
    if isinstance(value, (torch.Tensor, _Array)):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: convert(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, list):
        return [convert(v, fn) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(convert(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: convert(v, fn) for k, v in value.items()}
    return value
