"""Stream safetensors checkpoints into a model built on the meta device.

Each tensor is read from disk, cast and moved to the target device one at a time and put in place of
its meta parameter, so the model is never in memory twice. Quantized linear modules (see
backend/quantization) receive their tensors through `load_tensor` and quantize on arrival.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

import backend.paths as paths
from backend.core.errors import GGUF_MESSAGE, UnsupportedModelError

DOWNLOAD_AGAIN = "it is probably truncated or corrupt (an interrupted download): delete it and download it again"


def fetch_again(file: Path) -> str:
    """What to do about a truncated or corrupt file: download it again, or, for a file of a built-in model (built
    or converted in the project's cache, backend/loading/builtin.py), delete it: the model is built again on its
    next load; nothing is downloaded."""
    try:
        built = Path(file).resolve().is_relative_to(paths.models_dir().resolve())
    except OSError:
        built = False
    if not built:
        return DOWNLOAD_AGAIN
    return (
        "it is probably truncated or corrupt: it belongs to a built-in model built in the project's cache "
        f"({paths.CACHE_ENV}); delete it (or its folder) and load the model again to build it anew"
    )


def read_index(index: Path) -> dict[str, str]:
    """The weight map (tensor name -> file) of a sharded checkpoint's index file."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UnsupportedModelError(
            f"{index} is not a valid checkpoint index (a JSON object with a 'weight_map'; {type(e).__name__}: "
            f"{e}); {DOWNLOAD_AGAIN}"
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UnsupportedModelError(f"{index}: 'weight_map' must map tensor names to file names; {DOWNLOAD_AGAIN}")
    return weight_map


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [path / name for name in sorted(set(read_index(index).values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UnsupportedModelError(
                f"{index.name} lists weight files that are not in {path}: {absent[:4]}; download them again"
            )
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.gguf")):
            raise UnsupportedModelError(f"{path} holds GGUF weights only. {GGUF_MESSAGE}")
        raise UnsupportedModelError(
            f"no *.safetensors weights in {path}; only safetensors checkpoints are loaded "
            "(convert .bin weights with `save_pretrained(..., safe_serialization=True)`)"
        )
    return files


@contextmanager
def open_safetensors(file: Path) -> Iterator:
    """`safe_open` whose failures (a truncated, empty or garbage file) name the file and say to download it again."""
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError: anything that makes the file unreadable
        raise UnsupportedModelError(f"{file} is not a readable safetensors file ({e}); {fetch_again(file)}") from None
    with handle as f:
        yield f


def _read(f, name: str, file: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise UnsupportedModelError(f"cannot read tensor {name} from {file} ({e}); {fetch_again(file)}") from None


def iter_checkpoint(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, load) pairs over every tensor of the checkpoint; `load()` reads one tensor from disk."""
    for file in checkpoint_files(path):
        with open_safetensors(file) as f:
            for name in f.keys():
                yield name, (lambda f=f, name=name, file=file: _read(f, name, file))


def checkpoint_keys(path: Path) -> set[str]:
    """Tensor names of the checkpoint, read from the safetensors headers only."""
    keys: set[str] = set()
    for file in checkpoint_files(path):
        with open_safetensors(file) as f:
            keys.update(f.keys())
    return keys


def names_match(model: nn.Module, keys: set[str]) -> bool:
    """Whether every weight of `model` (tied ones aside) is in the checkpoint under its own name."""
    prefix = getattr(model, "base_model_prefix", "")
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    stripped = {k.removeprefix(prefix + ".") for k in keys} if prefix else keys
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name in tied or name in keys or name.removeprefix(prefix + ".") in stripped:
            continue
        return False
    return True


@dataclass
class LoadReport:
    loaded: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Replace parameter or buffer `name` (dotted) with `value`, keeping its kind."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        value = nn.Parameter(value, requires_grad=False)
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value
    value._is_hf_initialized = True  # transformers' init functions skip flagged tensors
    return value


@dataclass(frozen=True)
class Region:
    """Checkpoint tensor -> `param[index]` of a parameter of shape `shape` that receives `parts` pieces."""

    param: str
    index: tuple
    shape: tuple[int, ...]
    parts: int


class RegionFiller:
    """Checkpoint tensors into regions of parameters (per-expert tensors into stacked experts, shards into a fused
    linear): the whole parameter is allocated on the device at its first piece, each piece copied into its place
    (the parameter is never in memory twice)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.filled: dict[str, list[int]] = {}  # param -> [pieces received, pieces expected]

    def put(self, region: Region, tensor: torch.Tensor) -> bool:
        """Copy `tensor` into its region; True when that completed the parameter."""
        param = self.model.get_parameter(region.param)
        if param.is_meta:  # first piece: allocate the whole parameter on the device
            param = set_tensor(
                self.model, region.param, torch.empty(region.shape, device=self.device, dtype=self.dtype)
            )
        target = param.data[region.index]
        if tuple(target.shape) != tuple(tensor.shape):
            raise UnsupportedModelError(
                f"checkpoint tensor for {region.param}{list(region.index)} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor)
        filled = self.filled.setdefault(region.param, [0, region.parts])
        filled[0] += 1
        return filled[0] == filled[1]

    def incomplete(self) -> list[str]:
        return [f"{p} ({got}/{want} pieces)" for p, (got, want) in self.filled.items() if got != want]


class StreamingLoader:
    """Maps checkpoint names to the model and puts each tensor in place."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        rename: Callable[[str], str | None] | None = None,
        on_loaded: Callable[[str], None] | None = None,
        regions: Callable[[str], "str | Region"] | None = None,
    ) -> None:
        """`on_loaded(name)`: called after each parameter is in place (the MoE experts quantizer's hook).
        `regions(name)`: a checkpoint name's model name, or the Region of a stacked parameter it fills
        (backend/loading/conversions.py: per-expert MoE tensors)."""
        self.model = model
        self.on_loaded = on_loaded
        self.regions = regions
        self.filler = RegionFiller(model, device, dtype)
        self.device = device
        self.dtype = dtype
        self.rename = rename
        self.targets = dict(model.named_parameters(remove_duplicate=False))
        self.targets.update(dict(model.named_buffers(remove_duplicate=False)))
        self.quant_modules = {n: m for n, m in model.named_modules() if hasattr(m, "load_tensor")}
        prefix = getattr(model, "base_model_prefix", "")
        self.base_prefix = f"{prefix}." if prefix else ""
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        self.keep_fp32 = re.compile("|".join(re.escape(k) for k in keep)) if keep else None

    def _resolve(self, name: str) -> str | None:
        if self.rename is not None:
            renamed = self.rename(name)
            if renamed is None:
                return None
            name = renamed
        for candidate in (name, self.base_prefix + name, name.removeprefix(self.base_prefix)):
            module_name = candidate.rpartition(".")[0]
            if candidate in self.targets or module_name in self.quant_modules:
                return candidate
        return None

    def load(self, checkpoint: Path) -> LoadReport:
        report = LoadReport()
        for raw_name, read in iter_checkpoint(checkpoint):
            mapped = self.regions(raw_name) if self.regions is not None else raw_name
            if isinstance(mapped, Region):
                if self.filler.put(mapped, read()):
                    report.loaded.add(mapped.param)
                    if self.on_loaded is not None:
                        self.on_loaded(mapped.param)
                continue
            name = self._resolve(mapped)
            if name is None:
                report.unexpected.append(raw_name)
                continue
            self.put(name, read())
            report.loaded.add(name)
        partial = self.filler.incomplete()
        if partial:
            raise UnsupportedModelError(f"the checkpoint lacks pieces of stacked weights: {partial[:6]}")
        self._tie_quantized(report)
        for module in self.quant_modules.values():
            module.finalize()
        return report

    def _tie_quantized(self, report: LoadReport) -> None:
        """A tied weight whose module is quantized (an lm_head quantized on the fly, tied to the embedding): the
        quantized module takes the source's tensor, as a plain tied weight would share it."""
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        for target, source in tied.items():
            module_name, _, attr = target.rpartition(".")
            if module_name in self.quant_modules and target not in report.loaded and source in report.loaded:
                weight = self.model.get_parameter(source).data  # the loaded tensor (`targets` holds the meta one)
                self.quant_modules[module_name].load_tensor(attr, weight, self.device, self.dtype)
                report.loaded.add(target)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        if module_name in self.quant_modules:
            self.quant_modules[module_name].load_tensor(attr, tensor, self.device, self.dtype)
            return
        target = self.targets[name]
        dtype = tensor.dtype
        if tensor.is_floating_point():
            keep = self.keep_fp32 is not None and self.keep_fp32.search(name)
            dtype = torch.float32 if keep else self.dtype
        if tuple(target.shape) != tuple(tensor.shape):
            raise UnsupportedModelError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        set_tensor(self.model, name, tensor.to(device=self.device, dtype=dtype))
        if self.on_loaded is not None:
            self.on_loaded(name)


def is_missing(param: torch.Tensor) -> bool:
    """A parameter no checkpoint tensor filled: still on meta, unless quantization replaced it (MoE experts: a meta
    placeholder beside their quantized modules, backend/quantization/experts.py)."""
    return param.is_meta and not getattr(param, "flab_quantized_away", False)


def materialize_leftovers(model: nn.Module, report: LoadReport, device: torch.device, model_name: str) -> None:
    """Tie shared weights, rebuild non-persistent buffers, and refuse a model with missing weights."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in tied.items():
        if target not in report.loaded and source in params and not params[source].is_meta:
            set_tensor(model, target, params[source])
            report.tied.append(target)
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if is_missing(p)]
    if missing:
        raise UnsupportedModelError(
            f"{model_name}: {len(missing)} weights were not found in the checkpoint (e.g. {missing[:4]}); the "
            "checkpoint names do not match the model. If transformers converts this checkpoint on load, it is not "
            "supported here yet."
        )
    meta_buffers = [n for n, b in model.named_buffers(remove_duplicate=False) if b.is_meta]
    for name in meta_buffers:
        buf = model.get_buffer(name)
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._buffers[attr] = torch.empty_like(buf, device=device)
    if meta_buffers and hasattr(model, "initialize_weights"):
        model.initialize_weights()  # only unflagged tensors (the buffers) are written
    still = [n for n, b in model.named_buffers() if b.is_meta]
    if still:
        raise UnsupportedModelError(f"{model_name}: could not rebuild buffers {still[:4]}")
