"""Every number of the Model panel is checked against its one range (EngineConfig's, ui/numbers.py) before
anything runs, and a KV budget over the free memory is refused with the numbers before anything is allocated, hosted
or not; the loaded engine stays."""

from __future__ import annotations

from backend.core.config import option_range
from backend.core.kv_sizing import free_memory
from tests.ui.conftest import LOAD_ARGS
from ui.panel import PANEL_NUMBERS


def test_each_box_names_itself_the_value_and_the_range_once(lab):
    engine = lab.session.current()
    for name, bad in (
        ("kv_cache_memory_gb", -5),
        ("kv_cache_memory_gb", 1e12),
        ("max_model_len", -1),
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", 0),
    ):
        status, _, _ = lab.loader.load(**dict(LOAD_ARGS, **{name: bad}))
        label = PANEL_NUMBERS[name].label
        assert f"{label}: {bad!r} is outside the allowed range" in status, (name, status)
        assert status.count("outside the allowed range") == 1
        assert lab.session.current() is engine and not engine.closed
    assert PANEL_NUMBERS["kv_cache_memory_gb"].allowed.high == option_range("kv_cache_memory_gb").high * 1024
    assert "0 = automatic" in PANEL_NUMBERS["kv_cache_memory_gb"].info()


def test_a_kv_budget_over_free_memory_is_refused_before_loading(lab):
    engine = lab.session.current()
    free, what = free_memory("cpu")
    kv_mb = round(4 * free / 2**20)  # in the box's range, four times what is free
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, kv_cache_memory_gb=kv_mb))
    assert "does not fit this machine" in status and f"the KV budget asked, {kv_mb:g} MiB" in status, status
    assert what in status and "still loaded, unchanged" in status
    assert lab.session.current() is engine and not engine.closed


def test_every_numeric_control_reads_its_bounds_from_one_field(lab):
    """Each number box and slider of the app takes its min / max from a NumberField (the Model panel's from
    EngineConfig's ranges), and Gradio's own bound check is left out so that the callback's check names the field."""
    import gradio as gr

    from ui.layout import build_demo
    from ui.numbers import RUN_NUMBERS
    from ui.panel import PANEL_NUMBERS

    demo = build_demo(lab, default_model=LOAD_ARGS["choice"])
    controls = [b for b in demo.blocks.values() if isinstance(b, (gr.Number, gr.Slider))]
    fields = list(PANEL_NUMBERS.values()) + list(RUN_NUMBERS.values())
    bounds = {(f.minimum, f.maximum) for f in fields}
    assert len(controls) >= 15
    for c in controls:
        assert (c.minimum, c.maximum) in bounds, (c.label, c.minimum, c.maximum)
        assert "preprocess" in vars(c) and c.preprocess(10**30) == 10**30, c.label  # no Gradio bound check
    by_label = {c.label: c for c in controls}
    batch = by_label["Max batch (sequences per step)"]
    assert (batch.minimum, batch.maximum) == (option_range("max_num_seqs").low, PANEL_NUMBERS["max_num_seqs"].maximum)
    steps = by_label["Token budget per step"]
    assert steps.maximum == option_range("max_num_batched_tokens").high and "1 to 1,048,576" in steps.info


def test_a_run_number_outside_its_range_is_named_once_before_anything_runs(lab):
    from tests.ui.test_callbacks import COMPARE, GEN

    engine = lab.session.current()
    steps = engine.stats().num_steps
    for name, bad, text in (
        ("top_k", 500, "top-k: 500 is outside the allowed range: an integer >= 0 and <= 200"),
        ("temperature", -1, "temperature: -1 is outside the allowed range: a number >= 0 and <= 2"),
        ("copies", 0, "copies: 0 is outside the allowed range: an integer >= 1 and <= 32"),
        ("seed", -2, "seed: -2 is outside the allowed range"),
    ):
        updates = list(lab.generate_tab.generate(**dict(GEN, **{name: bad})))
        assert len(updates) == 1 and text in updates[0][2] and updates[0][2].count("outside") == 1, updates[0][2]
    (status, *_), *_ = list(lab.compare_tab.compare(**dict(COMPARE, max_num_seqs=5000)))
    assert "Max batch: 5000 is outside the allowed range: an integer >= 1 and <= 256" in status
    assert engine.stats().num_steps == steps and lab.session.current() is engine  # nothing ran, nothing reloaded
