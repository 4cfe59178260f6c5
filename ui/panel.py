"""The Model panel's engine settings, generated from EngineConfig's declarations (backend/core/config.py): every
option whose OptionSpec says `app=True` gets a control, built from its kind, choices, range, default and help, so a
new option appears in the panel at once and its default is written once (in EngineConfig). `LOOKS` only says how an
option is shown where the generic control would not do (a label, a unit, a menu, a slider); `ROWS` keeps the
panel's two-column look, and any other app option follows one to a row.

The panel's values travel as a dict keyed by option name (`Panel.options`), each in its control's unit (the KV
budget in MiB where the option is in GiB; 0 where the option's None means "automatic"); `Panel.engine_options()`
turns them into the engine's values. The callbacks get them as keyword arguments (Gradio's `inputs_kwargs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import gradio as gr

from backend.core.config import EngineConfig
from backend.core.errors import EngineError
from ui import numbers
from ui.common import BLOCK_SIZES, IMPL_CHOICES, QUANT_CHOICES, device_choices, quantization_value
from ui.numbers import NumberField

QUANT_NONE = "as in checkpoint"  # what the quantization menu shows for the option's None
KERNELS_INFO = "fused: our C++ kernels; torch: torch ops; auto: fused for bf16 on CPU"


@dataclass(frozen=True)
class Look:
    """How the panel shows one option, where the generic control (from the spec alone) would not do."""

    label: str | None = None  # default: the option's name in words
    info: str | None = None  # default: the option's help
    widget: str | None = None  # radio | dropdown | slider | number | checkbox | textbox (default: from the kind)
    choices: Callable[[], list] | None = None  # the menu (default: the spec's choices)
    scale: float = 1.0  # the control's unit per option unit (MiB per GiB: 1024)
    zero_is_auto: str | None = None  # the option's None shown as 0, meaning this
    high: float | None = None  # a slider's top, where the engine takes more
    value: Any = field(default=None)  # the app's own starting value, where it is not the engine's default


LOOKS = {
    "model_impl": Look(
        "Implementation", "auto = native when there is one, else the transformers fallback", "radio",
        lambda: IMPL_CHOICES,
    ),
    "quantization": Look("Quantization", "", "dropdown", lambda: QUANT_CHOICES),
    "dtype": Look("dtype", "", "dropdown"),
    "device": Look("Device", "", "dropdown", device_choices),
    "block_size": Look("Block size (tokens)", "", "dropdown", lambda: BLOCK_SIZES),
    "kv_cache_memory_gb": Look("KV cache budget (MB, 0 = auto)", "", scale=1024, zero_is_auto="automatic"),
    "max_model_len": Look("Max context (0 = model's)", "", zero_is_auto="the model's own"),
    # a lab runs a few requests at once: 16 to start with, a slider up to 256 (the engine takes up to 4096)
    "max_num_seqs": Look("Max batch (sequences per step)", "", "slider", high=256, value=16),
    "max_num_batched_tokens": Look("Token budget per step", "longer prompts are prefilled in chunks of this size"),
    "trust_remote_code": Look("Trust remote code", "set by whoever runs the app (--allow-remote-code)"),
    "cpu_kernels": Look("CPU kernels", KERNELS_INFO, "radio"),
}  # fmt: skip
ROWS = (
    ("model_impl",),
    ("quantization", "dtype"),
    ("device", "block_size"),
    ("kv_cache_memory_gb", "max_model_len"),
    ("max_num_seqs", "max_num_batched_tokens"),
)


def app_options() -> list[str]:
    """The options the panel shows, in declaration order (OptionSpec.app)."""
    return [f.name for f in fields(EngineConfig) if EngineConfig.spec(f.name).app]


def rows() -> list[tuple[str, ...]]:
    """The panel's rows: ROWS, then every other app option one to a row."""
    placed = {name for row in ROWS for name in row}
    shown = set(app_options())
    return [tuple(n for n in row if n in shown) for row in ROWS] + [(n,) for n in app_options() if n not in placed]


def look(name: str) -> Look:
    return LOOKS.get(name, Look())


def label(name: str) -> str:
    return look(name).label or name.replace("_", " ").capitalize()


def widget(name: str) -> str:
    spec, lk = EngineConfig.spec(name), look(name)
    if lk.widget:
        return lk.widget
    if spec.kind is bool:
        return "checkbox"
    if spec.choices is not None:
        return "radio" if len(spec.choices) <= 4 else "dropdown"
    if spec.range() is not None:
        return "number"
    return "textbox"


def number_field(name: str) -> NumberField | None:
    """The range of a numeric option's control (EngineConfig's, in the control's unit), None for the others."""
    spec, lk = EngineConfig.spec(name), look(name)
    if spec.range() is None:
        return None
    text = label(name).split(" (")[0]  # "KV cache budget (MB, 0 = auto)" -> errors say "KV cache budget (MB)"
    unit = "MB" if lk.scale == 1024 else None
    return NumberField.for_option(
        f"{text} ({unit})" if unit else text, name, scale=1 / lk.scale, zero_is_auto=lk.zero_is_auto, high=lk.high
    )


def to_box(name: str, value):
    """An engine value -> what the option's control shows."""
    lk = look(name)
    if name == "quantization":
        return value or QUANT_NONE
    if value is None and lk.zero_is_auto:
        return 0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and lk.scale != 1:
        return round(value * lk.scale, 3)
    return value


def to_engine(name: str, value):
    """What the option's control holds -> the engine's value (None: the engine's own default)."""
    spec, lk = EngineConfig.spec(name), look(name)
    if name == "quantization":
        return quantization_value(value)
    if value in (None, "") or (lk.zero_is_auto and value == 0):
        return None
    if spec.kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        v = value / lk.scale if lk.scale != 1 else value
        if spec.kind is int and float(v).is_integer():
            return int(v)
        return float(v) if spec.kind is float else v
    return value


def start_value(name: str):
    """The control's first value: the app's own where LOOKS gives one, else the engine's default."""
    lk = look(name)
    return to_box(name, lk.value if lk.value is not None else EngineConfig.default(name))


def panel_numbers() -> dict[str, NumberField]:
    """The panel's numeric options and their ranges, by option name."""
    return {name: f for name in app_options() if (f := number_field(name)) is not None}


PANEL_NUMBERS = panel_numbers()


@dataclass(frozen=True)
class Panel:
    """The Model panel's values: the model picked and the engine options by name, in their controls' units."""

    choice: str
    options: dict[str, Any]

    @classmethod
    def of(cls, choice: str, **options) -> "Panel":
        """The panel with these options (by option name, in the controls' units); the others at their first value.
        An unknown name is refused (EngineError naming it)."""
        unknown = sorted(set(options) - set(app_options()))
        if unknown:
            raise EngineError(f"unknown panel option(s) {unknown}; the panel's: {app_options()}", param=unknown[0])
        return cls(choice, {name: options.get(name, start_value(name)) for name in app_options()})

    def __getitem__(self, name: str):
        return self.options[name]

    def replace(self, **options) -> "Panel":
        return Panel.of(self.choice, **{**self.options, **options})

    def values(self) -> tuple:
        """(choice, then every option's value in app_options() order): the page-load outputs."""
        return (self.choice,) + tuple(self.options[n] for n in app_options())

    def engine_options(self) -> dict:
        """The engine's values of the options set (None left out: the engine's own default)."""
        out = {name: to_engine(name, value) for name, value in self.options.items()}
        return {name: value for name, value in out.items() if value is not None}


def check_panel_numbers(panel: Panel) -> None:
    """Every number of the Model panel against its one range, before anything else looks at the panel."""
    for name, box in panel_numbers().items():
        value = panel[name]
        if value in (None, ""):
            continue  # not given: the engine's default
        box.check(value)


def host_panel(choice: str, allow_remote_code: bool = False) -> Panel:
    """The panel's values when a page opens: the host's model with the host's engine settings (what the app loads at
    start-up and what the panel's controls show first)."""
    from ui import defaults

    return Panel.of(choice, kv_cache_memory_gb=defaults.suggested_kv_mb(choice), trust_remote_code=allow_remote_code)


def panel_values(spec) -> Panel:
    """A LoadSpec -> what the panel shows for the engine that is loaded (a built-in model by its name, as the picker
    names it)."""
    opts = spec.engine_kwargs()
    return Panel.of(spec.model, **{name: to_box(name, opts.get(name, EngineConfig.default(name))) for name in
                                   app_options()})  # fmt: skip


def build_controls(panel: Panel, overrides: dict[str, dict] | None = None) -> dict[str, gr.components.Component]:
    """The panel's controls in its rows (call inside the Engine accordion), each built from its option's spec and
    LOOKS, with `panel`'s values; `overrides`: a control's own keyword arguments (e.g. remote code's label)."""
    controls = {}
    for row in rows():
        with gr.Row() if len(row) > 1 else _nothing():
            for name in row:
                controls[name] = _control(name, panel[name], (overrides or {}).get(name, {}))
    return controls


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _control(name: str, value, extra: dict):
    spec, lk = EngineConfig.spec(name), look(name)
    kwargs = dict(label=label(name), info=lk.info if lk.info is not None else spec.help)
    kwargs = {k: v for k, v in kwargs.items() if v} | extra
    kind = widget(name)
    if kind in ("number", "slider"):
        box = number_field(name)
        if kind == "slider":
            return numbers.slider(box, value, **kwargs)
        info = kwargs.pop("info", None)
        return numbers.number(box, value, info=info, **kwargs)
    if kind == "checkbox":
        return gr.Checkbox(value, **kwargs)
    choices = lk.choices() if lk.choices is not None else list(spec.choices or ())
    if kind == "radio":
        return gr.Radio(choices, value=value, **kwargs)
    if kind == "dropdown":
        return gr.Dropdown(choices, value=value, **kwargs)
    return gr.Textbox(value or "", **kwargs)
