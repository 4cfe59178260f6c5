"""EngineConfig: every engine option, declared once.

Each field carries an `OptionSpec` in its metadata (`option(...)`): its kind, what values are allowed (choices, or
an inclusive range), whether None is allowed, its help text and its command-line flags. From that one declaration
come the validation (`EngineConfig.__post_init__`, errors name the option in `EngineError.param`), the command-line
flags of `python -m backend.launch_server` and the benchmarks (`add_engine_flags`, `engine_options_from_args`) and
the defaults they show. A rule that a range cannot say is checked after the generic ones (`_extra_checks`).

    EngineConfig.spec("block_size").help      # the declaration of one option
    add_engine_flags(parser, group="engine")  # --block-size, --max-num-seqs, ... with the engine's defaults
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields

import torch

from backend.core.checks import is_int, is_real
from backend.core.errors import EngineError
from backend.core.sampling import MAX_SEED  # one bound for a request's seed and the engine's
from backend.layers.attention_backends import ATTENTION_BACKENDS as _ATTENTION_REGISTRY

MODEL_IMPLS = ("auto", "native", "transformers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_BACKENDS = ("auto", *_ATTENTION_REGISTRY)  # backend/layers/attention_backends.py
CPU_LINEARS = ("auto", "packed", "upcast", "none")  # how 16-bit linears run on CPU (backend/layers)
CPU_KERNELS = ("auto", "fused", "torch")  # our C++ CPU kernels (flab_kernels/cpu) or torch ops


@dataclass(frozen=True)
class Range:
    """A numeric option's allowed range, derived from its OptionSpec (`option_range`): the engine's check, the app's
    number boxes and the app's panel check read it. `low_open`: the low end is excluded."""

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


@dataclass(frozen=True)
class OptionSpec:
    """One option's declaration (the field's metadata["spec"])."""

    kind: type  # str, bool, int or float (a bool is never an int or a float here)
    help: str
    optional: bool = False  # None is allowed (and means what the help says)
    choices: tuple | None = None
    min: float | None = None  # bounds, inclusive
    max: float | None = None
    above: float | None = None  # an exclusive lower bound
    expect: str | None = None  # how an error says what is allowed (default: from kind, choices and range)
    flags: tuple[str, ...] = ()  # command-line spellings, the first the main one (default: --name-with-dashes)
    cli: bool = True  # offered by add_engine_flags (False: set by other means, e.g. the hosting policy)
    app: bool = False  # a control in the app's Model panel (ui/panel.py builds it from this declaration)

    def expected(self) -> str:
        if self.expect:
            return self.expect
        if self.choices is not None:
            return f"one of {self.choices}"
        if self.range() is not None:
            return self.range().describe()
        what = {str: "a string", bool: "True or False", int: "an integer", float: "a number"}[self.kind]
        if self.min is not None:
            what += f" >= {self.min}"
        return ("None or " if self.optional else "") + what

    def range(self) -> Range | None:
        """A numeric option's allowed range (both ends declared), as the app's number boxes show it."""
        low = self.above if self.above is not None else self.min
        if self.kind not in (int, float) or low is None or self.max is None:
            return None
        return Range(low, self.max, self.kind is int, self.above is not None)

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        ok = {str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool), int: is_int}.get(
            self.kind, is_real
        )(value)
        if not ok:
            return False
        if self.choices is not None and value not in self.choices:
            return False
        allowed = self.range()  # the one bounds check the app's number boxes read too
        if allowed is not None:
            return allowed.contains(value)
        return (
            (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
            and (self.above is None or value > self.above)
        )


def option(default, kind: type, help: str, **spec) -> Field:
    """A field of EngineConfig with its declaration (see OptionSpec)."""
    return field(default=default, metadata={"spec": OptionSpec(kind, help, **spec)})


@dataclass(frozen=True)
class EngineConfig:
    model: str = option(MISSING, str, "Hub id, local checkpoint folder, or a built-in model name", cli=False)
    model_impl: str = option(
        "auto",
        str,
        "native: our model code; transformers: the transformers model with our attention injected; auto: native "
        "when the architecture has one",
        choices=MODEL_IMPLS,
        app=True,
    )
    quantization: str | None = option(
        None, str, "weight quantization, e.g. int8 (see the README); None: as the checkpoint is", optional=True,
        expect="None or a string such as 'int8'", app=True,
    )  # fmt: skip
    dtype: str = option("auto", str, "weights and activations dtype", choices=("auto", *DTYPES), app=True)
    device: str = option("auto", str, "auto, cpu, cuda or cuda:N", expect="'auto', 'cpu' or 'cuda[:N]'", app=True)
    trust_remote_code: bool = option(
        False,
        bool,
        "allow modeling code shipped in the checkpoint (the server: the same as --allow-remote-code)",
        app=True,
    )
    revision: str | None = option(None, str, "Hub revision (branch, tag or commit)", optional=True)
    allow_local_paths: bool = option(
        True, bool, "False: `model` is a built-in name or a Hub id, never a local folder (hosting)", cli=False
    )
    # KV cache
    block_size: int = option(16, int, "tokens per KV block (a power of two up to 256)", min=1, max=256, app=True)
    kv_cache_memory_gb: float | None = option(
        None, float, "KV cache budget in GiB; None: a share of free memory (checked against free memory at start)",
        optional=True, above=0, max=2**20, app=True,
    )  # fmt: skip
    num_kv_blocks: int | None = option(
        None, int, "KV cache blocks (overrides the memory budget)", optional=True, min=1, max=2**24
    )
    max_model_len: int | None = option(
        None, int, "context length (prompt + output tokens) per request; None: what the model and the budget allow",
        optional=True, min=1, max=2**24, flags=("--max-model-len", "--context-length"), app=True,
    )  # fmt: skip
    enable_prefix_caching: bool = option(True, bool, "share KV blocks of common prompt prefixes")
    prefix_cache_per_owner: bool = option(
        False, bool, "requests share prefix-cache blocks only with requests of the same owner (the owner joins each "
        "request's cache_salt); the hosting policy turns it on", cli=False,
    )  # fmt: skip
    # scheduler
    max_num_seqs: int = option(
        64, int, "requests in the running batch at once", min=1, max=4096,
        flags=("--max-num-seqs", "--max-running-requests"), app=True,
    )  # fmt: skip
    max_num_batched_tokens: int = option(
        2048, int, "tokens per engine step; prefills are chunked to fit", min=1, max=2**20, app=True
    )
    tp_size: int = option(
        1, int, "tensor parallelism: ranks, one process each (gloo on CPU, NCCL on CUDA)", min=1, max=64,
        flags=("--tp-size", "--tensor-parallel-size"),
    )  # fmt: skip
    max_running_per_owner: int | None = option(
        None, int, "cap on one owner's running sequences (hosting); None: no cap", optional=True, min=1, max=2**20,
        cli=False,
    )  # fmt: skip
    # kernels
    attention_backend: str = option("auto", str, "attention kernels (auto: torch on CPU, triton on CUDA)",
                                    choices=ATTENTION_BACKENDS)  # fmt: skip
    cpu_linear: str = option(
        "auto", str,
        "16-bit linears on CPU: packed (oneDNN prepacked weights; CPUs with bf16/fp16 matmul), upcast (fp32 copies "
        "for many-row products; CPUs without), none (plain F.linear); auto picks by CPU",
        choices=CPU_LINEARS,
    )  # fmt: skip
    cpu_kernels: str = option(
        "auto", str,
        "our C++ CPU kernels (flab_kernels/cpu, built on first use; backend/layers/cpu/fused.py): fused uses them "
        "(GEMV linears for decode rows; native models: fused RMSNorm, paged decode attention), torch never, auto for "
        "bf16 models on CPU; where they cannot build or run, the torch path runs and describe() says why",
        choices=CPU_KERNELS, app=True,
    )  # fmt: skip
    keep_freed_memory: bool = option(
        True, bool, "CPU: keep freed memory in the process (glibc mallopt, backend/core/host_allocator.py) so per-step "
        "activations are not page-faulted in again on every layer; process-wide",
    )  # fmt: skip
    seed: int = option(
        0, int, "engine seed for requests without their own seed", min=0, max=MAX_SEED,
        expect="an integer in [0, 2**63)",
    )  # fmt: skip
    skip_tokenizer_init: bool = option(
        False, bool, "run on token ids only (as vLLM's skip_tokenizer_init): no tokenizer is loaded, prompts are "
        "token ids and outputs carry no text; for checkpoint folders that ship no tokenizer",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for f in fields(self):
            spec: OptionSpec = f.metadata["spec"]
            value = getattr(self, f.name)
            if not spec.accepts(value):
                raise EngineError(f"{f.name} must be {spec.expected()}, got {value!r:.60}", param=f.name)
        self._extra_checks()

    def _extra_checks(self) -> None:
        """What a kind and a range cannot say."""
        if not self.model.strip():
            raise EngineError(
                "model must be a Hub id, a local folder path or a built-in model name, got ''", param="model"
            )
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise EngineError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}", param="device")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(
                "device='cuda' was asked for but no CUDA device is available; use device='cpu'", param="device"
            )
        if self.block_size & (self.block_size - 1):
            raise EngineError(f"block_size must be a power of two up to 256, got {self.block_size}", param="block_size")

    @staticmethod
    def spec(name: str) -> OptionSpec:
        """The declaration of option `name`."""
        return _FIELDS[name].metadata["spec"]

    @staticmethod
    def default(name: str):
        return _FIELDS[name].default

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        unknown = sorted(set(kwargs) - set(_FIELDS))
        if unknown:
            raise EngineError(
                f"unknown engine option(s) {unknown}; known options: {sorted(set(_FIELDS) - {'model'})}",
                param=unknown[0],
            )
        return cls(model=model, **kwargs)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


_FIELDS: dict[str, Field] = {f.name: f for f in fields(EngineConfig)}


def option_range(name: str) -> Range:
    """The declared range of numeric EngineConfig option `name` (KeyError for an option without one)."""
    allowed = EngineConfig.spec(name).range() if name in _FIELDS else None
    if allowed is None:
        raise KeyError(name)
    return allowed


# --- command-line flags, generated from the declarations ------------------------------------------------------


def engine_option_names() -> list[str]:
    """The options offered on the command line, in declaration order."""
    return [n for n, f in _FIELDS.items() if f.metadata["spec"].cli]


def add_engine_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: list[str] | None = None,
    defaults: dict | None = None,
    help_overrides: dict[str, str] | None = None,
) -> None:
    """Add a flag per engine option (`names`: these, in this order; default: every option offered on the command
    line). A flag's default is None (the engine's own default applies, shown in the help) unless `defaults` gives
    the tool's own; a bool gets --x / --no-x. Read them back with `engine_options_from_args`."""
    defaults = defaults or {}
    for name in names or engine_option_names():
        spec = EngineConfig.spec(name)
        default = defaults.get(name)
        shown = defaults.get(name, _FIELDS[name].default)
        text = (help_overrides or {}).get(name, spec.help) + f" (default: {shown})"
        flags = spec.flags or (f"--{name.replace('_', '-')}",)
        kwargs: dict = dict(dest=name, default=default, help=text)
        if spec.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = spec.kind
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
        parser.add_argument(*flags, **kwargs)


def engine_options_from_args(args: argparse.Namespace, names: list[str] | None = None) -> dict:
    """The engine options the command line set (those left at None keep the engine's defaults)."""
    names = names or engine_option_names()
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
