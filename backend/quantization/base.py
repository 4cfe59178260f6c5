"""The two interfaces of the quantization layer: a method (what to swap) and a quantized linear (what loads).

Protocol with the loader (backend/models/checkpoint.py):

1. The model is built on `meta`; `apply_quantization(model, method)` replaces every `nn.Linear` that
   `method.skip(prefix)` does not keep, by `method.create_linear(linear, prefix)` (also on meta, holding
   no tensors yet).
2. The loader streams the checkpoint: a tensor `<prefix>.<name>` whose module is quantized goes to
   `module.load_tensor(name, tensor, device, dtype)` (dtype = activation dtype). Native models that fuse
   shards (q/k/v, gate/up) first merge the shards' tensors with `module.merge_shards(name, tensors,
   shard_out_features)`, which concatenates along `module.output_dim(name)`.
3. `module.finalize()` once, after the last tensor: converts to the kernel layout and names the module
   and the tensors that never arrived.

Every quantized tensor lives in a buffer, so the engine's weight bytes (sum of nbytes of parameters and
buffers) measure it.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from backend.core.errors import QuantizationError

SUPPORTED_DEVICES = ("cpu", "cuda")
KERNELS = ("auto", "torch", "triton")  # auto: CPU fast path / torch on CPU, Triton (or _scaled_mm) on CUDA


def module_matches(prefix: str, pattern: str) -> bool:
    """Does module `prefix` match a checkpoint ignore-list entry?

    `re:<regex>` entries (compressed-tensors, `re.match` semantics) match the prefix or one of its dotted suffixes
    (the engine may wrap the HF model, e.g. `hf.model.layers.0...`). Plain entries match a whole dotted
    component run: "lm_head" matches "hf.lm_head", "model.layers.0.mlp" matches its children.
    """
    parts = prefix.split(".")
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.match(".".join(parts[i:])) for i in range(len(parts)))
    return f".{pattern}." in f".{prefix}."


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


class QuantLinearBase(nn.Module, ABC):
    """A quantized replacement of `nn.Linear(in_features, out_features, bias)`; see the module docstring."""

    method: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, prefix: str = "") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.prefix = prefix
        self.kernel = "unset"  # chosen at finalize: which matmul runs
        self.act_dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.register_buffer("bias", None)
        self._received: set[str] = set()
        self._finalized = False

    # ---- protocol -------------------------------------------------------------------------------------
    @abstractmethod
    def checkpoint_tensor_names(self) -> set[str]:
        """The tensor name suffixes this module takes from a checkpoint."""

    @abstractmethod
    def output_dim(self, name: str) -> int | None:
        """Dim of checkpoint tensor `name` along which output features lie; None = not concatenable."""

    def required_tensor_names(self) -> set[str]:
        """Tensors finalize() cannot do without (default: all but bias; bias is required iff bias=True)."""
        names = self.checkpoint_tensor_names() - {"bias"}
        return names | {"bias"} if self.has_bias else names

    def merge_shards(self, name: str, shards: list[torch.Tensor], shard_out_features: list[int]) -> torch.Tensor:
        """Merge the checkpoint tensors of fused shards (q/k/v or gate/up) into one for `load_tensor`.

        Concatenates along `output_dim(name)`; a tensor with no output dim (e.g. GPTQ's g_idx, which is
        identical across shards since they share the input) is taken from the first shard.
        """
        self._check_name(name)
        dim = self.output_dim(name)
        if dim is None:
            return shards[0]
        return torch.cat(shards, dim=dim)

    def load_tensor(self, name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        """Store checkpoint tensor `name` on `device`; `dtype` is the activation dtype."""
        self._begin_load(name, device, dtype)
        if name == "bias":
            self._load_bias(tensor)
        else:
            self._load(name, tensor)
        self._received.add(name)

    @abstractmethod
    def _load(self, name: str, tensor: torch.Tensor) -> None:
        """Store (or, on the fly, quantize) one checkpoint tensor other than bias; device/dtype are set."""

    def finalize(self) -> None:
        """Called once after the last tensor: check completeness, repack for the kernel in use (idempotent)."""
        if self._finalized:
            return
        self._check_complete()
        self._finalize()
        self._finalized = True

    def _finalize(self) -> None:
        """Turn the loaded checkpoint tensors into the kernel layout (on-the-fly methods did it on arrival)."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:  # (N, K) float32
        """The full-precision weight the forward computes with (for tests and inspection, not the hot path)."""

    # ---- helpers for subclasses -------------------------------------------------------------------------
    def _where(self) -> str:
        return f"{self.prefix or type(self).__name__} ({self.method})"

    def _check_name(self, name: str) -> None:
        if name not in self.checkpoint_tensor_names():
            raise QuantizationError(
                f"{self._where()}: unexpected checkpoint tensor {name!r}; this module takes "
                f"{sorted(self.checkpoint_tensor_names())}"
            )

    def _begin_load(self, name: str, device: torch.device, dtype: torch.dtype) -> None:
        self._check_name(name)
        if self.act_dtype is not None and (dtype != self.act_dtype or torch.device(device) != self.device):
            raise QuantizationError(f"{self._where()}: tensors loaded with different devices/dtypes")
        self.act_dtype = dtype
        self.device = torch.device(device)

    def _check_shape(self, name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise QuantizationError(
                f"{self._where()}: checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected)} for in_features={self.in_features}, out_features={self.out_features}"
            )

    def _load_bias(self, tensor: torch.Tensor) -> None:
        if not self.has_bias:
            raise QuantizationError(f"{self._where()}: the checkpoint has a bias but the model's layer has none")
        self._check_shape("bias", tensor, (self.out_features,))
        self.bias = tensor.to(device=self.device, dtype=self.act_dtype)

    def _check_complete(self) -> None:
        missing = sorted(self.required_tensor_names() - self._received)
        if missing:
            raise QuantizationError(
                f"{self._where()}: checkpoint tensors {missing} were not found for this layer "
                f"(got {sorted(self._received) or 'nothing'}); the checkpoint does not match its quantization_config"
            )

    def _prepare_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self.kernel == "unset":
            raise QuantizationError(f"{self._where()}: forward before finalize(); the weights were never loaded")
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, self.in_features).to(self.act_dtype), lead  # (M, K)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"{self.describe()}, kernel={self.kernel}"
        )

    def describe(self) -> str:
        return f"method={self.method}"


class QuantMethod(ABC):
    """A quantization method: which linears to swap and what to swap them with."""

    name: ClassVar[str]
    on_the_fly: ClassVar[bool] = False  # True: quantizes a full-precision checkpoint while loading it
    config_class: ClassVar[type | None] = None  # the method's settings (a dataclass); None: it keeps its own

    def __init__(self, config=None, ignore: list[str] | None = None) -> None:
        self.config = config if config is not None or self.config_class is None else self.config_class()
        # the output projection stays in full precision unless an on-the-fly config's `lm_head` says otherwise
        keep_head = getattr(self.config, "lm_head", "none") == "none"
        self.ignore = list(ignore) if ignore is not None else (["lm_head"] if keep_head else [])

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "QuantMethod":
        """An on-the-fly request's options ("int4:g64,kernel=torch", see `parse_request`) -> the method. Each
        option names a field of `config_class` and is converted to the type of that field's default."""
        if not cls.on_the_fly or cls.config_class is None:
            raise QuantizationError(f"{cls.name!r} is not quantized on the fly, so it takes no options")
        fields = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise QuantizationError(
                f"{cls.name} options are {sorted(fields)} (e.g. '{cls.name}:kernel=torch'), got {unknown}"
            )
        values = {}
        for key, text in options.items():
            kind = type(fields[key])
            try:
                values[key] = _parse_bool(text) if kind is bool else kind(text)
            except ValueError:
                raise QuantizationError(
                    f"{cls.name} option {key} must be of type {kind.__name__}, got {text!r}"
                ) from None
        if values.get("kernel", "auto") not in KERNELS:
            raise QuantizationError(f"kernel must be one of {KERNELS}, got {values['kernel']!r}")
        return cls(cls.config_class(**values))

    def check_device(self, device: torch.device) -> None:
        device = torch.device(device)
        if device.type not in SUPPORTED_DEVICES:
            raise QuantizationError(
                f"quantization {self.name!r} runs on cpu or cuda, not {device.type}; use device='cpu' or 'cuda'"
            )
        if device.type == "cuda" and torch.cuda.is_available():
            from flab_kernels._triton import HAS_TRITON

            if not HAS_TRITON:
                raise QuantizationError(
                    f"quantization {self.name!r} on CUDA needs Triton: `pip install triton`, or use device='cpu'"
                )
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (7, 0):
                raise QuantizationError(
                    f"quantization {self.name!r} uses Triton kernels that need a GPU of compute capability 7.0 or "
                    f"newer (this one is {major}.{minor}); use device='cpu' or quantization=None"
                )

    def skip(self, prefix: str) -> bool:
        """Modules left in full precision: lm_head by default, plus the checkpoint's ignore list."""
        return any(module_matches(prefix, pattern) for pattern in self.ignore)

    def set_kernel(self, kernel: str) -> None:
        """Force the matmul of every module: "auto", "torch" (exact dequantize-per-forward) or "triton"."""
        if kernel not in KERNELS:
            raise QuantizationError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.config.kernel = kernel

    @abstractmethod
    def create_linear(self, linear: nn.Linear, prefix: str) -> QuantLinearBase:
        """The quantized replacement of `linear` (built on meta; same in/out features and bias)."""

    def quantize_dense(
        self,
        weight: torch.Tensor,  # (N, K) full precision
        prefix: str,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,  # (N,)
    ) -> QuantLinearBase:
        """A loaded quantized linear from a dense weight already in memory (on its device; `dtype` = activations):
        the module `create_linear` builds, fed through the loader protocol (load_tensor, finalize), so it packs
        and multiplies exactly as a streamed one. On-the-fly methods only (checkpoint formats take their tensors)."""
        if not self.on_the_fly:
            raise QuantizationError(f"{self.name!r} loads quantized checkpoint tensors; it cannot quantize {prefix}")
        n, k = weight.shape
        with torch.device("meta"):
            linear = nn.Linear(k, n, bias=bias is not None)
        module = self.create_linear(linear, prefix)
        module.load_tensor("weight", weight, weight.device, dtype)
        if bias is not None:
            module.load_tensor("bias", bias, weight.device, dtype)
        module.finalize()
        return module

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
