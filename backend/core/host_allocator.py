"""glibc malloc settings for CPU inference: keep freed memory in the process instead of returning it.

By default glibc serves big blocks (128 KiB and up, a threshold it raises as it goes) with fresh `mmap`
pages and gives the top of its heap back to the kernel once more than twice that is free. A prefill
chunk allocates and frees tens of MiB of activations per layer (a 2048-token chunk of SmolLM2-135M's
MLP alone makes a 12 MiB gate/up product), so every layer of every step touches pages the kernel has
to fault in and zero again. Measured on the 2-core bench VM: the MLP of one 2048-token layer took
8-14 ms by default against 5 ms with freed memory kept; the prefill steps of the bench's throughput
workload 1.4-2.8 s against 1.4 s.

`keep_freed_memory()` sets, once per process:
  - M_MMAP_THRESHOLD = 32 MiB (glibc's upper limit): blocks below it come from the heap, so they are
    reused; bigger ones (the KV cache, weights) are still mapped and unmapped on their own;
  - M_TRIM_THRESHOLD = 2 GiB: freed heap memory stays with the process for the next step.
The resident size then stays at its high-water mark, which a serving process reaches anyway. It is a
process-wide setting, so the bench applies it before any system runs (the HF baselines get it too).

Loading is the opposite case: tensors of a few MiB are read, converted or quantized and dropped while what stays
is allocated between them, so a heap that keeps everything fragments into a resident size far above the weights.
Measured on a random Mixtral-shaped MoE (8 layers, 8 experts of 1024 x 2816, bf16) quantized to int8 as it streams
in: 1.8 to 3.2 GiB of anonymous memory after loading (runs differ) for 0.55 GiB of weights, against 0.85 GiB with
the setting below; SmolLM2-135M in int4: 0.45 to 0.66 GiB against 0.45 GiB, for 25-40% more load time (1.8-2.2 s
against 2.3-2.8 s; the decode step after loading is the same). `map_big_blocks()`, which the engine applies while it
loads (then `keep_freed_memory()` again): blocks of 4 MiB and up get their own mappings, unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum for 64-bit
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
LOADING_MMAP_THRESHOLD = 4 * 2**20  # while a model loads: its tensors map and unmap on their own
LOADING_TRIM_THRESHOLD = 128 * 2**10  # glibc's default


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _set(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def keep_freed_memory() -> bool:
    """Apply the serving settings above (glibc only); True when they took effect. Calling it again is harmless."""
    return _set(MMAP_THRESHOLD, TRIM_THRESHOLD)


def map_big_blocks() -> bool:
    """The loading settings (module docstring): blocks of 4 MiB and up mapped on their own, the heap trimmed as
    glibc does by default; True when they took effect. `keep_freed_memory()` switches back."""
    return _set(LOADING_MMAP_THRESHOLD, LOADING_TRIM_THRESHOLD)


def release_freed_memory() -> bool:
    """Hand the freed memory glibc keeps back to the kernel now (malloc_trim); True when some was released.
    The bench calls it between runs, so each run's peak RSS starts from what is really in use."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None and hasattr(libc, "malloc_trim") else False
