"""EngineConfig: every engine option in one validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from backend.checks import is_int, is_real
from backend.errors import EngineError
from backend.layers.attention_backends import ATTENTION_BACKENDS as _ATTENTION_REGISTRY

MODEL_IMPLS = ("auto", "native", "transformers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_BACKENDS = ("auto", *_ATTENTION_REGISTRY)  # backend/layers/attention_backends.py
CPU_LINEARS = ("auto", "packed", "upcast", "none")  # how 16-bit linears run on CPU (backend/layers)
CPU_KERNELS = ("auto", "fused", "torch")  # our C++ CPU kernels (flab_kernels/cpu) or torch ops


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
    block_size: int = 16
    kv_cache_memory_gb: float | None = None  # budget for the KV cache; None = a share of free memory
    num_kv_blocks: int | None = None  # overrides the memory budget (tests use it to force preemption)
    max_model_len: int | None = None  # defaults to the model's context, capped by max_model_len_cap
    enable_prefix_caching: bool = True
    # scheduler
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per-step token budget; prefills are chunked to fit
    tp_size: int = 1  # tensor parallelism: ranks (this process is rank 0; backend/distributed)
    max_running_per_owner: int | None = None  # cap on one owner's running sequences (hosting); None = no cap
    # kernels
    attention_backend: str = "auto"  # torch on CPU, triton on CUDA
    # 16-bit linears on CPU: "packed" (oneDNN prepacked weights; CPUs with bf16/fp16 matmul), "upcast" (fp32
    # copies for many-row products; CPUs without), "none" (plain F.linear); "auto" picks by CPU
    cpu_linear: str = "auto"
    # our C++ CPU kernels (flab_kernels/cpu, built on first use; backend/layers/cpu/fused.py): "fused" uses them
    # (GEMV linears for decode rows; native models: fused RMSNorm, paged decode attention), "torch" never, "auto" for
    # bf16 models on CPU; where they cannot build or run, the torch path runs and describe() says why
    cpu_kernels: str = "auto"
    # CPU: keep freed memory in the process (glibc mallopt, backend/host_allocator.py) so per-step activations
    # are not page-faulted in again on every layer; process-wide
    keep_freed_memory: bool = True
    seed: int = 0
    # run on token ids only (as vLLM's skip_tokenizer_init): no tokenizer is loaded, prompts are token ids and
    # outputs carry no text; for checkpoint folders that ship no tokenizer
    skip_tokenizer_init: bool = False

    def __post_init__(self) -> None:
        for name in ("model", "model_impl", "dtype", "device", "attention_backend", "cpu_linear", "cpu_kernels"):
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
        if self.cpu_kernels not in CPU_KERNELS:
            raise EngineError(f"cpu_kernels must be one of {CPU_KERNELS}, got {self.cpu_kernels!r}")
        optional = ("num_kv_blocks", "max_model_len", "max_running_per_owner")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tp_size", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not is_int(value) or value <= 0:
                raise EngineError(f"{name} must be a positive integer, got {value!r:.60}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise EngineError(f"seed must be an integer in [0, 2**63), got {self.seed!r:.60}")
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise EngineError(f"block_size must be a power of two up to 256, got {self.block_size}")
        gb = self.kv_cache_memory_gb
        if gb is not None and not (is_real(gb) and gb > 0):
            raise EngineError(f"kv_cache_memory_gb must be a positive number of GiB, got {gb!r:.60}")

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
