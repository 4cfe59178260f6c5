"""Quantization as a swap of nn.Linear before the weights load (MoE experts right after), the same for native and
transformers models.

    method = resolve_quantization(requested, hf_config)     # None, or a QuantMethod
    method.check_device(device)
    check_experts_quantization(model, method, keys)         # refusals for MoE experts (experts.py)
    swapped = apply_quantization(model, method)             # on the meta model, before loading
    ... loader: module.load_tensor(name, tensor, device, dtype) per tensor, module.finalize() once ...
    quantize_experts(model, method)                         # after loading: MoE experts (stacked, not nn.Linear)

`requested`: None = run the checkpoint as it is (auto-detects `quantization_config`); "int8", "int4",
"fp8" quantize a full-precision checkpoint on the fly, with options after a colon: "int4:g64",
"int4:group_size=64,kernel=torch". Naming the checkpoint's own method is the same as None, and may
force the matmul: "gptq:kernel=torch" (kernel = auto | torch | triton). See base.py for the module protocol.
"""

from __future__ import annotations

from types import MappingProxyType

from torch import nn

from backend.core.errors import GGUF_MESSAGE, QuantizationError, UnsupportedModelError
from backend.quantization.awq import AWQMethod
from backend.quantization.base import QuantLinearBase, QuantMethod, module_matches
from backend.quantization.compressed_tensors import CompressedTensorsMethod
from backend.quantization.experts import (
    ExpertsQuantizer,
    QuantizedExperts,
    check_experts_quantization,
    quantize_experts,
)
from backend.quantization.fp8 import Fp8Method
from backend.quantization.fp8_checkpoint import Fp8CheckpointMethod
from backend.quantization.gptq import GPTQMethod
from backend.quantization.int4 import Int4Method
from backend.quantization.int8 import Int8Method

__all__ = [
    "QUANTIZATION_METHODS",
    "QuantMethod",
    "QuantLinearBase",
    "resolve_quantization",
    "apply_quantization",
    "quantize_loaded_linears",
    "quantize_experts",
    "ExpertsQuantizer",
    "check_experts_quantization",
    "QuantizedExperts",
    "checkpoint_quant_config",
    "module_matches",
]

QUANTIZATION_METHODS: dict[str, type[QuantMethod]] = {
    "int8": Int8Method,
    "int4": Int4Method,
    "fp8": Fp8Method,
    "gptq": GPTQMethod,
    "awq": AWQMethod,
    "fp8_checkpoint": Fp8CheckpointMethod,
    "compressed-tensors": CompressedTensorsMethod,
}

# quant_method values found in checkpoints -> registry key
CHECKPOINT_METHODS = MappingProxyType(
    {
        "gptq": "gptq",
        "awq": "awq",
        "fp8": "fp8_checkpoint",
        "compressed-tensors": "compressed-tensors",
        "compressed_tensors": "compressed-tensors",
    }
)


def checkpoint_quant_config(hf_config) -> dict | None:
    """The checkpoint's `quantization_config` as a dict (it may be a dict or a transformers config object)."""
    qcfg = (
        getattr(hf_config, "quantization_config", None)
        if not isinstance(hf_config, dict)
        else hf_config.get("quantization_config")
    )
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict() if hasattr(qcfg, "to_dict") else dict(vars(qcfg))
    return qcfg


def parse_request(requested: str) -> tuple[str, dict[str, str]]:
    """ "int4:g64,kernel=torch" -> ("int4", {"group_size": "64", "kernel": "torch"})."""
    name, _, rest = requested.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        if "=" in item:
            key, _, value = item.partition("=")
            options[key.strip()] = value.strip()
        elif item[0] == "g" and item[1:].isdigit():
            options["group_size"] = item[1:]
        else:
            raise QuantizationError(
                f"cannot parse quantization option {item!r} in {requested!r} "
                "(use e.g. 'int4:g64' or 'int4:group_size=64')"
            )
    name = name.strip().lower()
    return ("compressed-tensors" if name == "compressed_tensors" else name), options


def resolve_quantization(requested: str | None, hf_config, group_size: int | None = None) -> QuantMethod | None:
    """The method to apply, from the request and the checkpoint's quantization_config (see module docstring)."""
    qcfg = checkpoint_quant_config(hf_config)
    ckpt_method = str(qcfg.get("quant_method", "")).lower() if qcfg is not None else None
    if ckpt_method == "gguf" or (requested or "").strip().lower().startswith("gguf"):
        raise UnsupportedModelError(GGUF_MESSAGE)
    if qcfg is not None and ckpt_method not in CHECKPOINT_METHODS:
        supported = sorted(set(CHECKPOINT_METHODS))
        raise QuantizationError(
            f"the checkpoint is quantized with {ckpt_method or '(no quant_method)'!r}, which is "
            f"not supported; supported checkpoint formats: {supported}"
        )
    if requested is None or requested.strip().lower() in ("", "none"):
        if qcfg is None:
            return None
        return QUANTIZATION_METHODS[CHECKPOINT_METHODS[ckpt_method]].from_checkpoint(qcfg)
    name, options = parse_request(requested)
    if group_size is not None:
        options["group_size"] = str(group_size)
    if qcfg is not None:
        if name in (ckpt_method, CHECKPOINT_METHODS[ckpt_method]):
            if set(options) - {"kernel"}:
                raise QuantizationError(
                    f"{requested!r}: a checkpoint's quantization takes only the kernel= option "
                    f"(its settings come from quantization_config), got {sorted(options)}"
                )
            method = QUANTIZATION_METHODS[CHECKPOINT_METHODS[ckpt_method]].from_checkpoint(qcfg)
            if "kernel" in options:
                method.set_kernel(options["kernel"])
            return method
        raise QuantizationError(
            f"the checkpoint is already quantized ({ckpt_method}); it cannot be quantized again "
            f"with {requested!r}: pass quantization=None to run it as it is, or use a "
            "full-precision checkpoint"
        )
    cls = QUANTIZATION_METHODS.get(name)
    if cls is None:
        raise QuantizationError(
            f"unknown quantization {name!r}; on-the-fly methods: "
            f"{[k for k, c in QUANTIZATION_METHODS.items() if c.on_the_fly]}, checkpoint formats "
            "(auto-detected, pass None): gptq, awq, fp8, compressed-tensors"
        )
    if not cls.on_the_fly:
        raise QuantizationError(
            f"{name!r} is a checkpoint format, and this checkpoint is not quantized: use a {name} "
            "checkpoint, or quantize on the fly with 'int8', 'int4' or 'fp8'"
        )
    return cls.from_options(options)


def checkpoint_module_names(model: nn.Module, name: str) -> list[str]:
    """The checkpoint's names for module `name`: its shards when a native model fuses them (`stacked_params`,
    e.g. qkv_proj <- q_proj, k_proj, v_proj), else the name itself."""
    parent, _, leaf = name.rpartition(".")
    stacked = sorted((s for s in getattr(model, "stacked_params", ()) if s.fused == leaf), key=lambda s: s.index)
    return [f"{parent}.{s.shard}" if parent else s.shard for s in stacked] or [name]


def _linear_targets(model: nn.Module, method: QuantMethod) -> list[tuple[str, nn.Linear, str]]:
    """(module name, linear, its first checkpoint name) of every nn.Linear that `method` quantizes.

    A fused linear of a native model is judged by its shards' checkpoint names (ignore lists and targets name
    those); it is quantized when all its shards are, kept when none is, refused when they disagree.
    """
    targets = []
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        names = checkpoint_module_names(model, name)
        skipped = [method.skip(n) for n in names]
        if all(skipped):
            continue
        if any(skipped):
            raise QuantizationError(
                f"{name} fuses {names}, but the checkpoint quantizes only some of them "
                f"({[n for n, s in zip(names, skipped) if not s]}); run it with model_impl='transformers'"
            )
        targets.append((name, linear, names[0]))
    return targets


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_quantization(model: nn.Module, method: QuantMethod) -> list[str]:
    """Swap every nn.Linear not skipped by `method` for its quantized module, in place; returns their prefixes."""
    swapped: list[str] = []
    for name, linear, checkpoint_name in _linear_targets(model, method):
        module = method.create_linear(linear, checkpoint_name)
        module.prefix = name
        _replace(model, name, module)
        swapped.append(name)
    return swapped


def quantize_loaded_linears(model: nn.Module, method: QuantMethod) -> list[str]:
    """`apply_quantization` for a model whose full-precision weights are already loaded (transformers' own loader,
    for checkpoints that need its name conversions): each nn.Linear is quantized from its dense weight and
    replaced, one at a time, so the peak memory is the full-precision model plus one quantized linear. The same
    quantized modules as when streamed, except that the weight has already been cast to the model's dtype."""
    swapped: list[str] = []
    for name, linear, _ in _linear_targets(model, method):
        weight = linear.weight.detach()  # (N, K)
        bias = linear.bias.detach() if linear.bias is not None else None
        _replace(model, name, method.quantize_dense(weight, name, weight.dtype, bias))
        swapped.append(name)
    return swapped
