"""Compile the C++ CPU kernels (csrc/) on first use, for the best instruction set this CPU has.

One source, one extension per instruction set (`flab_cpu_<isa>`), each built with that set's compiler flags by
`torch.utils.cpp_extension.load` into `<cache_dir()>/cpu_kernels/<torch version>/<isa>-<hash>` (backend/paths.py), so a
second process loads the built library in well under a second. The set is chosen at run time from the CPU's
flags (/proc/cpuinfo, cross-checked with `torch.backends.cpu.get_cpu_capability()`): AVX512-BF16 (bf16 dot
products), AVX512F, AVX2+FMA; when a variant does not build (a compiler without `-mavx512bf16`), the next lower
one is tried. `load_cpu_kernels()` never raises: it returns the module or the reason there is none (no compiler,
no ninja, no supported instruction set, a failed build), and the caller runs the torch path and says why.

The loaded module is cached by a function-level `functools.cache` (one handle per build folder and variant list):
the process's only state here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (
    "bindings.cpp",
    "tensor_ops.cpp",
    "decode_stack.cpp",
    "gemv.cpp",
    "amx.cpp",
    "norm_act.cpp",
    "attention.cpp",
    "claim.cpp",
)
# instruction set -> the CPU flags it needs and the compiler flags it is built with (best first)
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "amx": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma", "amx_tile", "amx_bf16"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mavx2", "-mf16c")
        + ("-mamx-tile", "-mamx-bf16"),
    ),
    "avx512bf16": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mavx2", "-mf16c"),
    ),
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-mf16c"),
    ),
    "avx2": (("avx2", "fma"), ("-mavx2", "-mfma", "-mf16c")),
}
ISA_ENV = "FLAB_CPU_ISA"  # the highest instruction set to use (tests of the lower paths on a better CPU)
COMMON_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")  # fp32 as torch


@dataclass(frozen=True)
class CpuKernels:
    """The outcome of loading: `module` (None when unavailable), its instruction set, and which or why not."""

    module: ModuleType | None
    isa: str | None
    reason: str  # "built for avx512bf16" / "loaded ..." or why the torch path runs

    @property
    def available(self) -> bool:
        return self.module is not None


def cpu_flags() -> set[str] | None:
    """The CPU's flags from /proc/cpuinfo (None where it cannot be read: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def supported_isas(flags: set[str] | None) -> list[str]:
    """The variants this CPU can run, best first (none off x86 Linux, or when torch itself sees no AVX2)."""
    if flags is None or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return []
    return [isa for isa, (needs, _) in VARIANTS.items() if all(f in flags for f in needs)]


def build_dir(root: Path, isa: str) -> Path:
    """`<root>/cpu_kernels/torch-<version>/<isa>-<hash of the sources and flags>`: an edited source builds into a
    new folder (a running process keeps the library it loaded)."""
    digest = hashlib.sha256(" ".join((*COMMON_FLAGS, *VARIANTS[isa][1])).encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return root / "cpu_kernels" / f"torch-{torch.__version__}" / f"{isa}-{digest.hexdigest()[:12]}"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx)


def _load_variant(isa: str, folder: Path) -> ModuleType:
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    name = f"flab_cpu_{isa}"
    if not any(folder.glob(f"{name}*.so")):
        print(
            f"fallback-lab: compiling the C++ CPU kernels for {isa} into {folder} (first use, about a minute)",
            file=sys.stderr,
            flush=True,
        )
    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=[*COMMON_FLAGS, *VARIANTS[isa][1]],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        verbose=False,
    )


@functools.cache
def load_cpu_kernels(root: Path, isas: tuple[str, ...]) -> CpuKernels:
    """The first of `isas` (best first) that builds and loads from `root`'s build folders; never raises."""
    if not isas:
        return CpuKernels(None, None, "no supported instruction set (the C++ CPU kernels need AVX2 + FMA on x86)")
    if _compiler() is None:
        return CpuKernels(None, None, f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH)")
    if shutil.which("ninja") is None:
        return CpuKernels(None, None, "ninja is not installed (torch.utils.cpp_extension builds with it)")
    failures = []
    for isa in isas:
        try:
            module = _load_variant(isa, build_dir(root, isa))
        except Exception as e:  # a compiler error, a missing header, a library that does not load
            last = [line for line in str(e).strip().splitlines() if line.strip()]
            failures.append(f"{isa}: {last[-1] if last else type(e).__name__}"[:300])
            continue
        return CpuKernels(module, isa, f"C++ kernels for {isa}")
    return CpuKernels(None, None, "the C++ CPU kernels did not build (" + "; ".join(failures) + ")")


def capped_isas(isas: list[str], cap: str | None) -> list[str]:
    """`isas` without those above `cap` (`$FLAB_CPU_ISA`: run a lower instruction set than the CPU's best, e.g.
    the AVX2 kernels on an AVX512 machine); unknown names raise ValueError."""
    if not cap:
        return isas
    if cap not in VARIANTS:
        raise ValueError(f"{ISA_ENV}={cap!r} is not one of {', '.join(VARIANTS)}")
    order = list(VARIANTS)
    return [isa for isa in isas if order.index(isa) >= order.index(cap)]


def cpu_kernels(cache: Path) -> CpuKernels:
    """The kernels for this CPU, built on first use under `cache` (the project's cache folder, backend/paths.py),
    for its best instruction set or the one `$FLAB_CPU_ISA` caps it to."""
    try:
        isas = capped_isas(supported_isas(cpu_flags()), os.environ.get(ISA_ENV))
    except ValueError as e:
        return CpuKernels(None, None, str(e))
    return load_cpu_kernels(cache.resolve(), tuple(isas))
