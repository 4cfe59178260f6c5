"""MoE experts quantized on the fly (int8, int4, fp8), native (backend/models/moe.py) and transformers' experts modules.

Experts are stacked parameters, not `nn.Linear`: `gate_up_proj (E, 2I, H)` / `down_proj (E, H, I)` (native and most
transformers 5 experts), or `(E, H, 2I)` / `(E, I, H)` where transformers marks the module `is_transposed` (gpt-oss);
a module without a gate has `up_proj` instead of `gate_up_proj`. After the weights load, `quantize_experts` turns
each expert's two weights into the method's own quantized linear (`QuantMethod.quantize_dense`: the same module,
packing and matmul as the model's swapped linears, no second kernel), held by a `QuantizedExperts` registered as
`<experts>.flab_quantized`; the stacked parameters become meta placeholders of the same shape (so the parameter
count still sees them and memory holds one copy). Routers and expert biases stay full precision. The experts'
forward (moe.Experts._product, layers/cpu/packed_experts.py) then runs one quantized product per expert that has
tokens: a loop over experts, never over tokens.

When: while the checkpoint streams in, each experts module is quantized as soon as both its weights have loaded
(`ExpertsQuantizer.loaded`, called by the native and the streaming loaders), so the peak holds one layer's experts at
full precision beside the quantized rest. A checkpoint that transformers' own loader converts (per-expert tensors
for a model without a native implementation) arrives whole, at full precision: `quantize_experts` then quantizes
every experts module after loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from backend.core.errors import QuantizationError
from backend.quantization.base import QuantLinearBase, QuantMethod

STACKED_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # an experts module's stacked weight parameters


@dataclass(frozen=True)
class ExpertsSite:
    """An experts module of a model and how its stacked weights are laid out."""

    path: str
    module: nn.Module
    up_name: str  # "gate_up_proj" or "up_proj" (transformers experts without a gate)
    transposed: bool  # (E, K, N) stacks: transformers' `is_transposed`


def experts_sites(model: nn.Module) -> list[ExpertsSite]:
    """Every MoE experts module holding stacked weight parameters (works on a meta model too)."""
    from backend.models.moe import Experts  # lazy: backend.models imports the quantization layer's users

    sites = []
    for path, module in model.named_modules():
        if isinstance(module, Experts):
            sites.append(ExpertsSite(path, module, "gate_up_proj", False))
            continue
        if not hasattr(module, "is_transposed"):  # transformers' experts modules (use_experts_implementation)
            continue
        up_name = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
        if isinstance(getattr(module, up_name, None), nn.Parameter) and isinstance(
            getattr(module, "down_proj", None), nn.Parameter
        ):
            sites.append(ExpertsSite(path, module, up_name, bool(module.is_transposed)))
    return sites


class QuantizedExperts(nn.Module):
    """Per expert, its up (gate_up or up) and down weights as quantized linears of one method."""

    def __init__(self, method: str, up: list[QuantLinearBase], down: list[QuantLinearBase]) -> None:
        super().__init__()
        self.method = method
        self.up = nn.ModuleList(up)
        self.down = nn.ModuleList(down)

    @property
    def num_experts(self) -> int:
        return len(self.up)

    def product(self, x: torch.Tensor, e: int, which: int) -> torch.Tensor:  # (n, K) -> (n, N) with expert e
        return (self.up, self.down)[which][e](x)

    def extra_repr(self) -> str:
        return f"method={self.method}, experts={self.num_experts}, {self.up[0].describe()}, kernel={self.up[0].kernel}"


def _quantize_stack(method: QuantMethod, site: ExpertsSite, name: str) -> list[QuantLinearBase]:
    stacked = getattr(site.module, name).detach()  # (E, N, K), or (E, K, N) when transposed
    if stacked.is_meta:
        raise QuantizationError(f"{site.path}.{name}: the experts' weights were never loaded")
    modules = []
    for e in range(stacked.shape[0]):
        weight = stacked[e].t() if site.transposed else stacked[e]  # (N, K)
        modules.append(method.quantize_dense(weight, f"{site.path}.{name}.{e}", stacked.dtype))
    setattr(site.module, name, quantized_placeholder(tuple(stacked.shape), stacked.dtype))
    return modules


def quantized_placeholder(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    """The meta parameter left in place of stacked experts weights quantized per expert (`shape` theirs)."""
    placeholder = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    placeholder.flab_quantized_away = True  # not a missing weight (backend/models/checkpoint.is_missing)
    placeholder._is_hf_initialized = True  # transformers' weight init leaves it alone
    return placeholder


def _quantize_site(site: ExpertsSite, method: QuantMethod) -> None:
    up = _quantize_stack(method, site, site.up_name)
    down = _quantize_stack(method, site, "down_proj")
    site.module.flab_quantized = QuantizedExperts(method.name, up, down)
    if hasattr(site.module, "is_transposed"):  # transformers: select our experts function (packed_experts.py)
        from backend.layers.cpu.packed_experts import register_experts

        site.module.config._experts_implementation = register_experts()


def _to_quantize(model: nn.Module, method: QuantMethod) -> list[ExpertsSite]:
    if not method.on_the_fly:
        return []
    return [
        site
        for site in experts_sites(model)
        if not method.skip(site.path) and getattr(site.module, "flab_quantized", None) is None
    ]


class ExpertsQuantizer:
    """Quantizes each experts module of `model` as soon as both its stacked weights have loaded: the loaders call
    `loaded(name)` with each parameter's name (relative to `model`) once it is complete."""

    def __init__(self, model: nn.Module, method: QuantMethod) -> None:
        self.method = method
        self.sites = {site.path: site for site in _to_quantize(model, method)}
        self._complete: dict[str, set[str]] = {}

    def loaded(self, name: str) -> None:
        path, _, attr = name.rpartition(".")
        site = self.sites.get(path)
        if site is None or attr not in (site.up_name, "down_proj"):
            return
        complete = self._complete.setdefault(path, set())
        complete.add(attr)
        if len(complete) == 2:
            _quantize_site(site, self.method)
            del self.sites[path]


def quantize_experts(model: nn.Module, method: QuantMethod) -> int:
    """Quantize every loaded experts module not quantized yet with on-the-fly `method` (module docstring); returns
    how many were quantized now. A transformers model's experts then run through our ExpertsInterface function."""
    sites = _to_quantize(model, method)
    for site in sites:
        _quantize_site(site, method)
    return len(sites)


def check_experts_quantization(model: nn.Module, method: QuantMethod, checkpoint_keys: Callable[[], set[str]]) -> None:
    """Refuse, before loading, what would run MoE experts wrongly or not as asked (model built on meta): a
    quantized checkpoint whose experts are quantized too (GPTQ / AWQ / compressed-tensors / FP8 tensors under an
    `experts.` module): only linears load quantized tensors, so such experts would be missing or wrong.

    Experts quantized on the fly run with any `tp_size`: tensor parallelism slices each expert's quantized linears
    to the rank's part of the intermediate size (backend/distributed/experts.py); a split that does not hold whole
    int4 / fp8 groups is refused when the ranks shard the loaded model."""
    if not experts_sites(model):
        return
    if not method.on_the_fly:
        quantized = sorted(
            k for k in checkpoint_keys() if ".experts." in k and k.rpartition(".")[2] not in _DENSE_NAMES
        )
        if quantized:
            raise QuantizationError(
                f"this {method.name} checkpoint quantizes the MoE experts ({len(quantized)} tensors, e.g. "
                f"{quantized[0]}), which the engine loads only in full precision (only linear layers load "
                "quantized checkpoint tensors); use a checkpoint whose experts are not quantized, or a "
                "full-precision one with quantization='int8' / 'int4' / 'fp8'"
            )


# last name parts of full-precision experts tensors: per-expert `experts.0.w1.weight`, or stacked `experts.down_proj`
_DENSE_NAMES = {"weight", "bias"} | {f"{n}{b}" for n in STACKED_WEIGHTS for b in ("", "_bias")}
