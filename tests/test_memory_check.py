"""Memory is checked on what will be allocated, in the engine's own start too (Python API users): weights + a KV
budget over the free memory is a KVCacheError naming the option, the amount and what is free, before anything loads
(backend/loading/memory_check.py), and every budget again before the cache is allocated (kv_sizing.check_kv_fits);
a budget outside the option's declared range is refused by EngineConfig, naming the option, the value and the
range."""

from __future__ import annotations

import pytest

from backend import Engine
from backend.core.config import EngineConfig, option_range
from backend.core.errors import EngineError, KVCacheError
from backend.core.kv_sizing import KVPlan, check_kv_fits, free_memory


def test_a_kv_budget_over_free_memory_is_refused_before_allocation(tiny_model):
    free, _ = free_memory("cpu")
    gib = 4 * free / 2**30  # four times what is free: any allocator would fail
    with pytest.raises(KVCacheError) as e:
        Engine(str(tiny_model("llama")), device="cpu", kv_cache_memory_gb=gib)
    message = str(e.value)
    assert message.startswith(f"kv_cache_memory_gb={gib:g} asks for a KV cache of ")
    assert "; with the weights " in message and "available RAM" in message and "smaller budget" in message


def test_a_budget_outside_its_range_names_the_option_and_the_range():
    with pytest.raises(EngineError) as e:
        EngineConfig.from_kwargs("some/model", kv_cache_memory_gb=1e12)
    assert str(e.value) == "kv_cache_memory_gb must be a number > 0 and <= 1.04858e+06, got 1000000000000.0"
    for name, bad in (("max_num_seqs", 0), ("max_num_seqs", 10**6), ("max_model_len", 2**30), ("block_size", 512)):
        with pytest.raises(EngineError, match=f"^{name} must be an integer >= 1 and <= "):
            EngineConfig.from_kwargs("some/model", **{name: bad})
    assert option_range("max_num_seqs").contains(64) and not option_range("max_num_seqs").contains(64.0)


def test_num_kv_blocks_over_free_memory_is_refused_too(tiny_model):
    config = EngineConfig.from_kwargs("m")
    assert config.num_kv_blocks is None  # an unset optional option passes its range check
    with pytest.raises(KVCacheError, match=r"^num_kv_blocks=16777216 asks for a KV cache of .* and the machine has"):
        Engine(str(tiny_model("llama")), device="cpu", num_kv_blocks=2**24)  # GiBs per 2**20 blocks: over any free RAM


def test_the_kv_check_before_allocation_names_the_option(tiny_model):
    """The second guard, for a model the pre-load check cannot read (a Hub id): the planned cache itself."""
    free, _ = free_memory("cpu")
    plan = KVPlan(max_model_len=64, num_blocks=4 * free // 2**14, block_size=16, bytes_per_token=2**10, budget_bytes=0)
    with pytest.raises(KVCacheError, match=r"^kv_cache_memory_gb=9 asks for a KV cache of .* \(after the weights\)"):
        check_kv_fits(plan, "cpu", 9.0, None)
    check_kv_fits(plan, "cpu", None, None)  # the automatic budget is a share of free memory: nothing to check
    small = KVPlan(max_model_len=64, num_blocks=4, block_size=16, bytes_per_token=2**10, budget_bytes=0)
    check_kv_fits(small, "cpu", 9.0, None)
