"""EngineConfig: every engine option in one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from backend.checks import is_int, is_real
from backend.errors import EngineError
from backend.layers.attention_backends import ATTENTION_BACKENDS as _ATTENTION_REGISTRY

MODEL_IMPLS = ("auto", "native", "transformers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_BACKENDS = ("auto", *_ATTENTION_REGISTRY)  # backend/layers/attention_backends.py
CPU_LINEARS = ("auto", "packed", "upcast", "none")  # how 16-bit linears run on CPU (backend/layers)


@dataclass(frozen=True)
class Range:
    """The one allowed range of a numeric EngineConfig option, declared on its field (`metadata["range"]`) and read
    by the engine's check, the app's number boxes and the app's panel check. `low_open`: the low end is excluded."""

    low: float
    high: float
    integer: bool = True
    low_open: bool = False

    def contains(self, value) -> bool:
        if not (is_int(value) if self.integer else is_real(value)):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        return f"{kind} {low} and <= {self.high:g}"


def ranged(default, low: float, high: float, integer: bool = True, low_open: bool = False):
    """A dataclass field with its allowed range as metadata (see Range)."""
    return field(default=default, metadata={"range": Range(low, high, integer, low_open)})


def option_range(name: str) -> Range:
    """The declared range of EngineConfig option `name` (KeyError for an option without one)."""
    for f in fields(EngineConfig):
        if f.name == name and "range" in f.metadata:
            return f.metadata["range"]
    raise KeyError(name)


def range_error(name: str, value, allowed: Range) -> str:
    return f"{name} must be {allowed.describe()}, got {value!r:.60}"


@dataclass
class EngineConfig:
    model: str
    model_impl: str = "auto"
    quantization: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    allow_local_paths: bool = True  # False: `model` is a built-in name or a Hub id, never a local folder (hosting)
    # KV cache
    block_size: int = ranged(16, 1, 256)  # and a power of two
    # budget for the KV cache in GiB; None = a share of free memory. Checked against free memory at start
    kv_cache_memory_gb: float | None = ranged(None, 0, 2**20, integer=False, low_open=True)
    num_kv_blocks: int | None = ranged(None, 1, 2**24)  # overrides the memory budget (tests force preemption)
    max_model_len: int | None = ranged(None, 1, 2**24)  # defaults to the model's context
    enable_prefix_caching: bool = True
    # scheduler
    max_num_seqs: int = ranged(64, 1, 4096)
    max_num_batched_tokens: int = ranged(2048, 1, 2**20)  # per-step token budget; prefills are chunked to fit
    tp_size: int = ranged(1, 1, 64)  # tensor parallelism: ranks (this process is rank 0; backend/distributed)
    # cap on one owner's running sequences (hosting); None = no cap
    max_running_per_owner: int | None = ranged(None, 1, 2**20)
    # kernels
    attention_backend: str = "auto"  # torch on CPU, triton on CUDA
    # 16-bit linears on CPU: "packed" (oneDNN prepacked weights; CPUs with bf16/fp16 matmul), "upcast" (fp32
    # copies for many-row products; CPUs without), "none" (plain F.linear); "auto" picks by CPU
    cpu_linear: str = "auto"
    # CPU: keep freed memory in the process (glibc mallopt, backend/host_allocator.py) so per-step activations
    # are not page-faulted in again on every layer; process-wide
    keep_freed_memory: bool = True
    seed: int = 0
    # run on token ids only (as vLLM's skip_tokenizer_init): no tokenizer is loaded, prompts are token ids and
    # outputs carry no text; for checkpoint folders that ship no tokenizer
    skip_tokenizer_init: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "model_impl", "dtype", "device", "attention_backend", "cpu_linear"):
            if not isinstance(getattr(self, name), str):
                raise EngineError(f"{name} must be a string, got {getattr(self, name)!r:.60}")
        if not self.model.strip():
            raise EngineError("model must be a Hub id, a local folder path or a built-in model name, got ''")
        if self.quantization is not None and not isinstance(self.quantization, str):
            raise EngineError(f"quantization must be None or a string such as 'int8', got {self.quantization!r:.60}")
        if self.revision is not None and not isinstance(self.revision, str):
            raise EngineError(f"revision must be None or a string, got {self.revision!r:.60}")
        for name in (
            "trust_remote_code",
            "enable_prefix_caching",
            "keep_freed_memory",
            "skip_tokenizer_init",
            "allow_local_paths",
        ):
            if not isinstance(getattr(self, name), bool):
                raise EngineError(f"{name} must be True or False, got {getattr(self, name)!r:.60}")
        if self.model_impl not in MODEL_IMPLS:
            raise EngineError(f"model_impl must be one of {MODEL_IMPLS}, got {self.model_impl!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise EngineError(f"dtype must be 'auto' or one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise EngineError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("device='cuda' was asked for but no CUDA device is available; use device='cpu'")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise EngineError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.cpu_linear not in CPU_LINEARS:
            raise EngineError(f"cpu_linear must be one of {CPU_LINEARS}, got {self.cpu_linear!r}")
        for f in fields(self):  # every numeric option against its declared range (None: the option's default rule)
            allowed = f.metadata.get("range")
            value = getattr(self, f.name)
            optional_unset = value is None and f.default is None
            if allowed is not None and not optional_unset and not allowed.contains(value):
                raise EngineError(range_error(f.name, value, allowed))
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise EngineError(f"seed must be an integer in [0, 2**63), got {self.seed!r:.60}")
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise EngineError(f"block_size must be a power of two up to 256, got {self.block_size}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise EngineError(f"unknown engine option(s) {unknown}; known options: {sorted(known - {'model'})}")
        return cls(model=model, **kwargs)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
