"""Every number the app takes, with its one range: the control reads its bounds from here and the callback checks
the value against the same range before anything runs (an error names the field, the value and what is allowed,
once). The Model panel's numbers take their ranges from EngineConfig's declarations (ui/panel.py's PANEL_NUMBERS,
`NumberField.for_option`); the run's numbers (copies, sampling, rounds, the benchmark's counts) are declared here.

The controls are Gradio's Slider / Number with Gradio's own bound check left out (`slider`, `number`): its message
names no field, and ours runs first in every callback instead, at every door (browser or API).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from backend.core.config import MAX_SEED, Range, option_range
from backend.core.errors import EngineError
from ui.benchmark import MAX_REPEAT, MAX_REQUESTS
from ui.compare import ROUNDS


@dataclass(frozen=True)
class NumberField:
    """One numeric input: its label (how errors name it), its allowed range in the control's unit, and what 0 means
    when it means "the engine decides" (`zero_is_auto`)."""

    label: str
    allowed: Range
    zero_is_auto: str | None = None

    @classmethod
    def for_option(
        cls, label: str, option: str, scale: float = 1.0, zero_is_auto: str | None = None, high: float | None = None
    ) -> "NumberField":
        """The field of EngineConfig option `option`, in a unit `scale` times the option's (e.g. MiB for GiB:
        1 / 1024); `high`: the app offers less than the engine takes (a slider's length)."""
        r = option_range(option)
        top = r.high / scale if high is None else min(high, r.high / scale)
        return cls(label, Range(r.low / scale, top, r.integer and scale == 1, r.low_open), zero_is_auto)

    @property
    def minimum(self) -> float:
        """The control's lower bound (0 where 0 means automatic)."""
        return 0 if self.zero_is_auto else self.allowed.low

    @property
    def maximum(self) -> float:
        return self.allowed.high

    def info(self) -> str:
        r = self.allowed
        auto = f"0 = {self.zero_is_auto}; else " if self.zero_is_auto else ""
        return f"{auto}{'>' if r.low_open else ''}{_fmt(r.low, r.integer)} to {_fmt(r.high, r.integer)}"

    def describe(self) -> str:
        """What is allowed, e.g. "an integer >= 1 and <= 16,777,216" (Range.describe with whole numbers written out)."""
        r = self.allowed
        kind = "an integer" if r.integer else "a number"
        return f"{kind} {'>' if r.low_open else '>='} {_fmt(r.low, r.integer)} and <= {_fmt(r.high, r.integer)}"

    def value(self, value):
        """`value` checked (EngineError naming the field, the value and the range, once), as an int for an integer
        field; 0 / empty stays as it came where 0 means automatic."""
        if self.zero_is_auto and value in (None, "", 0):
            return value
        r = self.allowed
        number = value
        if r.integer and isinstance(value, float) and value.is_integer():
            number = int(value)
        if isinstance(number, bool) or not r.contains(number):
            auto = f"0 ({self.zero_is_auto}) or " if self.zero_is_auto else ""
            raise EngineError(f"{self.label}: {value!r:.40} is outside the allowed range: {auto}{self.describe()}")
        return number

    def check(self, value) -> None:
        self.value(value)


def _fmt(x: float, integer: bool) -> str:
    return f"{int(x):,}" if integer or float(x).is_integer() else f"{x:g}"


def _checked_by_us(component):
    """Leave Gradio's own bound check out of `component` (its message names no field): the callback's NumberField
    check speaks instead. (Not a subclass: Gradio writes a stub file beside each Component subclass.)"""
    precision = component.precision

    def preprocess(payload):
        return None if payload is None else gr.Number.round_to_precision(payload, precision)

    component.preprocess = preprocess
    return component


def slider(field: NumberField, value, step: float = 1, **kwargs) -> gr.Slider:
    """A slider whose bounds are `field`'s."""
    return _checked_by_us(gr.Slider(field.minimum, field.maximum, value=value, step=step, **kwargs))


def number(field: NumberField, value, info: str | None = None, **kwargs) -> gr.Number:
    """A number box whose bounds are `field`'s, its range said under it (after `info`)."""
    shown = f"{info}; {field.info()}" if info else field.info()
    precision = 0 if field.allowed.integer else None
    box = gr.Number(value=value, minimum=field.minimum, maximum=field.maximum, precision=precision, info=shown,
                    **kwargs)  # fmt: skip
    return _checked_by_us(box)


RUN_NUMBERS = {  # the runs' numbers, by the callback parameter they arrive as
    "copies": NumberField("copies", Range(1, 32)),
    "max_new": NumberField("max new tokens", Range(1, option_range("max_model_len").high)),
    "temperature": NumberField("temperature", Range(0, 2, integer=False)),
    "top_p": NumberField("top-p", Range(0.05, 1, integer=False)),
    "top_k": NumberField("top-k", Range(0, 200)),
    "seed": NumberField("seed", Range(-1, MAX_SEED)),  # -1: random
    "gap_s": NumberField("arrival gap (s)", Range(0, 2, integer=False)),
    "rounds": NumberField("rounds", ROUNDS),
    "num_requests": NumberField("requests", Range(1, MAX_REQUESTS)),
    "repeat": NumberField("repeats", Range(1, MAX_REPEAT)),
}


def checked(**values) -> dict:
    """The run's numbers (RUN_NUMBERS' names) checked, in order; -> them as checked (ints for integer fields)."""
    return {name: RUN_NUMBERS[name].value(value) for name, value in values.items()}
