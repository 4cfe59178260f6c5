"""backend/core/host_allocator.py: after keep_freed_memory(), mid-sized blocks come from glibc's heap (reused from
step to step) instead of fresh mmap pages, blocks above the threshold are still mapped on their own, and
release_freed_memory() hands the kept memory back; the bench's per-run peak-RSS window built on it."""

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from backend import Engine
from backend.core.errors import UnsupportedModelError
from backend.core.host_allocator import keep_freed_memory, release_freed_memory
from backend.tools.bench import peak_rss, reset_peak_rss

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def mapped_bytes() -> int:
    """Bytes glibc currently holds in mmapped chunks (mallinfo2, glibc >= 2.33)."""
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(not glibc, reason="glibc malloc only")
def test_mid_sized_blocks_come_from_the_heap_and_big_ones_stay_mapped():
    # In a fresh process: glibc maps a big block only when no free heap chunk fits it, and earlier tests in this
    # process leave large free chunks in the (untrimmed) heap.
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import torch
from backend.core.host_allocator import MMAP_THRESHOLD, keep_freed_memory
from tests.test_host_allocator import mapped_bytes
assert keep_freed_memory()
before = mapped_bytes()
mid = torch.empty(16 * 2**20, dtype=torch.uint8)  # a prefill chunk's activation
assert mapped_bytes() - before < 2**20, "a 16 MiB block was mmapped: the threshold was not raised"
del mid
big = torch.empty(2 * MMAP_THRESHOLD, dtype=torch.uint8)  # a KV cache or a large weight
assert mapped_bytes() - before >= big.numel(), "a 64 MiB block came from the heap"
del big
assert keep_freed_memory()  # idempotent
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(not glibc, reason="glibc malloc only")
def test_while_loading_mid_sized_blocks_are_mapped_and_unmapped():
    """map_big_blocks(): an 8 MiB block (a weight being quantized) gets its own mapping and leaves with its free;
    keep_freed_memory() then serves the same size from the heap again."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import torch
from backend.core.host_allocator import keep_freed_memory, map_big_blocks
from tests.test_host_allocator import mapped_bytes
assert map_big_blocks()
before = mapped_bytes()
block = torch.empty(8 * 2**20, dtype=torch.uint8)
assert mapped_bytes() - before >= block.numel(), "an 8 MiB block came from the heap while loading"
del block
assert mapped_bytes() - before < 2**20, "the 8 MiB block stayed mapped after its free"
assert keep_freed_memory()
block = torch.empty(8 * 2**20, dtype=torch.uint8)
assert mapped_bytes() - before < 2**20, "an 8 MiB block was mapped while serving"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_engine_loads_with_big_blocks_mapped_then_keeps_freed_memory(tiny_model, monkeypatch):
    import backend.core.parts as engine_module  # where the engine loads its model

    calls: list[str] = []
    real_load = engine_module.load_model
    monkeypatch.setattr(engine_module, "map_big_blocks", lambda: calls.append("map big blocks") or True)
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append("keep freed memory") or True)
    monkeypatch.setattr(engine_module, "load_model", lambda *a: calls.append("load") or real_load(*a))
    with Engine(str(tiny_model("llama")), device="cpu", num_kv_blocks=16) as engine:
        assert calls == ["map big blocks", "load", "keep freed memory"]
        assert engine.describe()["malloc_keeps_freed_memory"] is True
    calls.clear()

    def broken(*a):
        calls.append("load")
        raise UnsupportedModelError("a broken checkpoint")

    monkeypatch.setattr(engine_module, "load_model", broken)
    with pytest.raises(UnsupportedModelError):
        Engine(str(tiny_model("llama")), device="cpu", num_kv_blocks=16)
    assert calls == ["map big blocks", "load", "keep freed memory"]  # a failed load restores the serving settings


@pytest.mark.skipif(not glibc, reason="glibc malloc only")
def test_engine_reports_the_setting(tiny_model):
    with Engine(str(tiny_model("llama")), device="cpu", num_kv_blocks=16) as engine:
        assert engine.describe()["malloc_keeps_freed_memory"] is True
    with Engine(str(tiny_model("llama")), device="cpu", num_kv_blocks=16, keep_freed_memory=False) as engine:
        assert engine.describe()["malloc_keeps_freed_memory"] is False


@pytest.mark.skipif(not glibc, reason="glibc malloc only")
def test_freed_memory_is_kept_until_released():
    assert keep_freed_memory()
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    held = [torch.ones(4 * 2**20 // 4) for _ in range(16)]  # 64 MiB in 4 MiB heap blocks, touched
    before_free = rss()
    del held
    assert rss() > before_free - 16 * 2**20  # freed, but still resident: kept for the next step
    assert release_freed_memory()
    assert rss() < before_free - 48 * 2**20  # handed back


@pytest.mark.skipif(not glibc, reason="Linux /proc only")
def test_peak_rss_window_resets_between_runs():
    reset_peak_rss()
    base = peak_rss()
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    del big
    assert peak_rss() >= base + 200 * 2**20
    reset_peak_rss()
    assert peak_rss() < base + 64 * 2**20  # the next run does not inherit that peak
