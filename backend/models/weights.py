"""Stream a checkpoint into a native model built on meta, fusing shards on the way.

Rules a native model declares:
  - `stacked_params`: (fused, shard, index) triples, e.g. ("qkv_proj", "q_proj", 0): the checkpoint's
    `...self_attn.q_proj.weight` is rows [0, q_size) of our `...self_attn.qkv_proj.weight`. Shard sizes come
    from the `fused_shards` dict of the module that owns the fused linear ({"qkv_proj": [q, kv, kv]}).
  - `rename_checkpoint(name) -> name` (optional): checkpoint module names that differ from ours.
  - `map_extra(name) -> Region | None` (optional): any other name that goes into part of a parameter
    (per-expert MoE tensors stacked into one (E, ...) parameter).
Plain fused linears get their full weight allocated on the device at the first shard, then each shard is
copied into its rows (the model is never in memory twice). Quantized linears (`load_tensor`) get, per
tensor name, the shards merged along `output_dim(name)` once all have arrived; `finalize()` follows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from backend.core.errors import UnsupportedModelError
from backend.layers.rotary import RotaryEmbedding
from backend.models.checkpoint import Region, RegionFiller, is_missing, iter_checkpoint, set_tensor

logger = logging.getLogger(__name__)

IGNORED = re.compile(r"(rotary_emb\.inv_freq|rotary_emb\.original_inv_freq)$")


@dataclass(frozen=True)
class StackedParam:
    fused: str  # our module name, e.g. "qkv_proj"
    shard: str  # the checkpoint's module name, e.g. "q_proj"
    index: int  # position of the shard inside the fused output dim


LLAMA_STACKED: tuple[StackedParam, ...] = (
    StackedParam("qkv_proj", "q_proj", 0),
    StackedParam("qkv_proj", "k_proj", 1),
    StackedParam("qkv_proj", "v_proj", 2),
    StackedParam("gate_up_proj", "gate_proj", 0),
    StackedParam("gate_up_proj", "up_proj", 1),
)


@dataclass
class _State:
    pending: dict[tuple[str, str], list[torch.Tensor | None]] = field(default_factory=dict)  # quantized shards
    unexpected: list[str] = field(default_factory=list)


class NativeWeightLoader:
    """`on_loaded(name)`: called with each parameter's name once it is complete (all its pieces in place); the MoE
    experts quantizer (backend/quantization/experts.py) quantizes a layer's experts then, as the checkpoint streams."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        on_loaded: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.on_loaded = on_loaded
        self.filler = RegionFiller(model, self.device, dtype)
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.quant = {n: m for n, m in self.modules.items() if hasattr(m, "load_tensor")}
        self.stacked = {s.shard: s for s in getattr(model, "stacked_params", ())}
        self.tied = bool(getattr(model, "tie_word_embeddings", False))
        self.state = _State()

    # ---- one tensor --------------------------------------------------------------------------------
    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype)

    def _put_whole(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        if module_name in self.quant:
            self.quant[module_name].load_tensor(attr, tensor, self.device, self.dtype)
            return
        if name not in self.params:
            self.state.unexpected.append(name)
            return
        if tuple(self.params[name].shape) != tuple(tensor.shape):
            raise UnsupportedModelError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(self.params[name].shape)}"
            )
        set_tensor(self.model, name, self._cast(tensor))
        self._loaded(name)

    def _loaded(self, name: str) -> None:
        if self.on_loaded is not None:
            self.on_loaded(name)

    def _put_region(self, region: Region, tensor: torch.Tensor) -> None:
        if self.filler.put(region, tensor):  # copy_ casts to the parameter's device and dtype
            self._loaded(region.param)

    def _put_shard(self, module_name: str, attr: str, index: int, tensor: torch.Tensor) -> None:
        parent_name, _, fused = module_name.rpartition(".")
        owner = self.modules.get(parent_name)
        if owner is None or fused not in getattr(owner, "fused_shards", {}):  # a name this model does not have
            self.state.unexpected.append(f"{module_name}.{attr}")
            return
        sizes: list[int] = owner.fused_shards[fused]
        if module_name in self.quant:  # merge all shards of this tensor name, then hand it over
            key = (module_name, attr)
            shards = self.state.pending.setdefault(key, [None] * len(sizes))
            shards[index] = tensor
            if all(s is not None for s in shards):
                module = self.quant[module_name]
                merged = (
                    module.merge_shards(attr, shards, sizes)
                    if hasattr(module, "merge_shards")
                    else _merge(module, attr, shards)
                )
                module.load_tensor(attr, merged, self.device, self.dtype)
                del self.state.pending[key]
            return
        name = f"{module_name}.{attr}"
        if name not in self.params:
            self.state.unexpected.append(name)
            return
        offset = sum(sizes[:index])
        shape = tuple(self.params[name].shape)
        self._put_region(Region(name, (slice(offset, offset + sizes[index]),), shape, len(sizes)), tensor)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if not name.startswith(("model.", "lm_head.")):  # base-model checkpoints omit the "model." prefix
            name = "model." + name
        if IGNORED.search(name) or (self.tied and name == "lm_head.weight"):
            return
        rename = getattr(self.model, "rename_checkpoint", None)
        if rename is not None:
            name = rename(name)
        extra = getattr(self.model, "map_extra", None)
        region = extra(name) if extra is not None else None
        if region is not None:
            self._put_region(region, tensor)
            return
        module_name, _, attr = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        stacked = self.stacked.get(leaf)
        if stacked is not None:
            self._put_shard(f"{parent}.{stacked.fused}", attr, stacked.index, tensor)
            return
        self._put_whole(name, tensor)

    # ---- the whole checkpoint ----------------------------------------------------------------------
    def load(self, path: Path) -> list[str]:
        for name, read in iter_checkpoint(path):
            self.put(name, read())
        self._tie()
        self._check()
        for module in self.quant.values():
            module.finalize()
        return self.state.unexpected

    def _tie(self) -> None:
        if not self.tied:
            return
        embed = self.model.get_parameter("model.embed_tokens.weight")
        if "lm_head" in self.quant:
            self.quant["lm_head"].load_tensor("weight", embed.data, self.device, self.dtype)
        elif not embed.is_meta:
            self.model.lm_head.weight = embed

    def _check(self) -> None:
        arch = type(self.model).__name__
        partial = self.filler.incomplete()
        partial += [f"{m}.{a}" for m, a in self.state.pending]
        missing = [n for n, p in self.model.named_parameters(remove_duplicate=False) if is_missing(p)]
        if missing or partial:
            raise UnsupportedModelError(
                f"{arch}: the checkpoint lacks weights the model needs: missing {missing[:6]}"
                + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else "")
                + (f"; incomplete fused/stacked {partial[:6]}" if partial else "")
                + ". The checkpoint names do not match this native implementation; try model_impl='transformers'."
            )
        if self.state.unexpected:
            logger.info(
                "%s: %d checkpoint tensors not used (e.g. %s)",
                arch,
                len(self.state.unexpected),
                self.state.unexpected[:3],
            )


def _merge(module: nn.Module, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    dim = module.output_dim(name)
    return shards[0] if dim is None else torch.cat(shards, dim=dim)


def build_buffers(model: nn.Module, device: torch.device) -> None:
    """Build every module's device buffers (rotary caches) and refuse a model that still has meta tensors."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    still = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if still:
        raise UnsupportedModelError(f"{type(model).__name__}: buffers left on meta after loading: {still[:4]}")
