"""Every number of the Model panel is checked against its one range (EngineConfig's, ui/common.PANEL_NUMBERS) before
anything runs, and a KV budget over the free memory is refused with the numbers before anything is allocated, hosted
or not; the loaded engine stays."""

from __future__ import annotations

from backend.core.config import option_range
from backend.core.kv_sizing import free_memory
from tests.ui.conftest import LOAD_ARGS
from ui.common import PANEL_NUMBERS


def test_each_box_names_itself_the_value_and_the_range_once(lab):
    engine = lab.session.current()
    for name, bad in (("kv_mb", -5), ("kv_mb", 1e12), ("max_len", -1), ("max_batch", 0), ("step_tokens", 0)):
        status, _, _ = lab.loader.load(**dict(LOAD_ARGS, **{name: bad}))
        label = PANEL_NUMBERS[name].label
        assert f"{label}: {bad!r} is outside the allowed range" in status, (name, status)
        assert status.count("outside the allowed range") == 1
        assert lab.session.current() is engine and not engine.closed
    assert PANEL_NUMBERS["kv_mb"].allowed().high == option_range("kv_cache_memory_gb").high * 1024
    assert "0 = automatic" in PANEL_NUMBERS["kv_mb"].info()


def test_a_kv_budget_over_free_memory_is_refused_before_loading(lab):
    engine = lab.session.current()
    free, what = free_memory("cpu")
    kv_mb = round(4 * free / 2**20)  # in the box's range, four times what is free
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, kv_mb=kv_mb))
    assert "does not fit this machine" in status and f"the KV budget asked, {kv_mb:g} MiB" in status, status
    assert what in status and "still loaded, unchanged" in status
    assert lab.session.current() is engine and not engine.closed
