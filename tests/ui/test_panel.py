"""The Model panel is generated from EngineConfig's declarations (ui/panel.py): every option marked for the app has a
control with the spec's default (or the app's own first value), choices and range, and a new option marked for the
app gets a control, a place in the panel's values and a way into the engine, with nothing else written."""

from __future__ import annotations

from dataclasses import fields, make_dataclass

import gradio as gr

from backend.core import config
from backend.core.config import EngineConfig, option, option_range
from tests.ui.conftest import LOAD_ARGS
from ui import panel


def _controls(p: panel.Panel) -> dict:
    with gr.Blocks():
        return panel.build_controls(p)


def test_every_app_option_has_a_control_with_the_specs_default_and_range():
    names = panel.app_options()
    assert names == [f.name for f in fields(EngineConfig) if EngineConfig.spec(f.name).app]
    assert {"model_impl", "kv_cache_memory_gb", "max_num_seqs", "cpu_kernels"} <= set(names)
    controls = _controls(panel.Panel.of("tiny:llama"))
    assert list(controls) == [n for row in panel.rows() for n in row] and set(controls) == set(names)
    for name, control in controls.items():
        spec = EngineConfig.spec(name)
        assert control.value == panel.start_value(name), name
        if panel.look(name).value is None:  # the app keeps the engine's default
            assert panel.to_engine(name, control.value) in (EngineConfig.default(name), None), name
        if spec.choices is not None and panel.look(name).choices is None:
            assert [c[1] for c in control.choices] == list(spec.choices), name
        if isinstance(control, (gr.Number, gr.Slider)):
            r = option_range(name)
            scale = panel.look(name).scale
            assert control.maximum == min(r.high * scale, panel.look(name).high or float("inf")), name
    assert controls["cpu_kernels"].value == EngineConfig.default("cpu_kernels") == "auto"
    assert controls["block_size"].value == EngineConfig.default("block_size")
    assert controls["max_num_batched_tokens"].value == EngineConfig.default("max_num_batched_tokens")


def test_a_new_option_marked_for_the_app_appears_in_the_panel(monkeypatch):
    knob = option(7, int, "a knob added for this test", min=1, max=9, app=True)
    copy = make_dataclass("EngineConfig", [("lab_test_knob", int, knob)], bases=(EngineConfig,), frozen=True)
    new_field = next(f for f in fields(copy) if f.name == "lab_test_knob")
    monkeypatch.setattr(panel, "EngineConfig", copy)
    monkeypatch.setitem(config._FIELDS, "lab_test_knob", new_field)

    assert panel.app_options()[-1] == "lab_test_knob" and panel.rows()[-1] == ("lab_test_knob",)
    controls = _controls(panel.Panel.of("tiny:llama"))
    box = controls["lab_test_knob"]
    assert isinstance(box, gr.Number) and (box.value, box.minimum, box.maximum) == (7, 1, 9)
    assert box.label == "Lab test knob" and "a knob added for this test" in box.info
    p = panel.Panel.of("tiny:llama", lab_test_knob=3)
    assert p.engine_options()["lab_test_knob"] == 3 and p.values()[-1] == 3
    bad = panel.Panel.of("tiny:llama", lab_test_knob=12)
    try:
        panel.check_panel_numbers(bad)
    except Exception as e:
        assert "Lab test knob: 12 is outside the allowed range: an integer >= 1 and <= 9" in str(e)
    else:
        raise AssertionError("12 passed the new option's range")


def test_the_panel_values_are_a_dict_by_option_name(lab):
    p = panel.Panel.of(LOAD_ARGS["choice"], **{k: v for k, v in LOAD_ARGS.items() if k != "choice"})
    assert p["kv_cache_memory_gb"] == 4 and p.engine_options()["kv_cache_memory_gb"] == 4 / 1024
    assert "max_model_len" not in p.engine_options()  # 0: the model's own
    assert "quantization" not in p.engine_options()  # "as in checkpoint": the engine's None
    assert panel.panel_values(lab.session.spec) == p  # the loaded engine's settings, back in the panel's units
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, no_such_option=1))
    assert "no_such_option" in status and "Load failed" in status
