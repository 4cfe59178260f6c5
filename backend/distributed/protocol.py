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

import torch

from backend.kv_cache import KVCache, KVCacheSpec

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
                kept[f.name] = to_device(value, torch.device("cpu"))
        return cls(kept, tuple(kv), type(fb))

    def forward_batch(self, kv_cache: KVCache, device: torch.device):
        fields = {k: to_device(v, device) for k, v in self.fields.items()}
        return self.batch_type(**fields, **{name: kv_cache for name in self.kv_fields})


def to_device(value, device: torch.device):
    """`value` with every tensor in it (dataclasses, lists, tuples, dicts) on `device`; other objects as they are."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
