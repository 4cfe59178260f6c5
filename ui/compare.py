"""The Compare tab's pure parts: labels, overlaid figures, summary and agreement tables, the verdict.

`CompareTab.compare` (ui/lab/compare_tab.py) loads settings A and B (both engines held at once), warms each up with
an untimed run of the same prompts (WARMUP_TOKENS each, prefix cache forgotten after), then runs the same greedy
workload in alternated rounds, A, B, A, B, ... (`run_order`), so that neither side is always first or always
measured while the machine is in one state; everything here takes the finished (or in-flight) rounds as plain
values: the curves show each side's last round, the table each side's median round, and the ratios B / A come
from the medians of the alternated rounds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import gradio as gr
import pandas as pd

from backend.core.config import CPU_KERNELS, Range
from ui.common import AGREEMENT_HEADERS, quantization_value, thin
from ui.plots import Series, batch_figure, memory_figure, throughput_figure, ttft_figure
from ui.summary import RATE_METRICS, agreement_rows, rates, summarize, summary_table
from ui.tables import column_widths

# the side-by-side table's columns are the sides' labels ("B: transformers · int8"): its longest word, 12 characters
SUMMARY_WIDTHS = column_widths(["metric", "A", "B"], {"metric": "40%", "A": 12, "B": 12})
AGREEMENT_WIDTHS = column_widths(
    AGREEMENT_HEADERS, {"prompt": "22%", "greedy outputs": "28%", "first difference": "32%"}
)
WARMUP_TOKENS = 4  # new tokens a request in a side's untimed warm-up run
ROUNDS = Range(1, 5)  # measured rounds per side (ui/numbers.py: the Compare tab's slider and its check)
DEFAULT_ROUNDS = 2
ORDER_ROW = "measured rounds (A, B alternated)"
RATIO_NOTE = "median of rounds"
KERNEL_CHOICES = list(CPU_KERNELS)  # EngineConfig.cpu_kernels: each side's kernel path (CPU)


@dataclass
class Round:
    """One measured run of a side: its requests, its steps and its wall time."""

    results: list
    series: Series
    wall_s: float


@dataclass
class Side:
    """One side: its label for tables and legends, and its measured rounds so far (the last may be in flight)."""

    label: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def last(self) -> Round:
        return self.rounds[-1]

    @property
    def results(self) -> list:
        return self.last.results

    @property
    def series(self) -> Series:
        return self.last.series

    @property
    def wall_s(self) -> float:
        return self.last.wall_s

    def median_round(self) -> Round:
        """The round whose output tok/s is the median (the lower middle one of an even count)."""
        key = "output tok/s (wall)"
        ranked = sorted(self.rounds, key=lambda r: rates(r.results, r.series, r.wall_s)[key] or 0.0)
        return ranked[(len(ranked) - 1) // 2]


@dataclass(frozen=True)
class SideSettings:
    """What one side loads: its name ("A"), implementation, quantization choice and CPU kernel path."""

    name: str
    impl: str
    quant: object  # the panel's quantization choice (a RemoteEndpoint for an endpoint side)
    kernels: str = "auto"


def run_order(names: list[str], rounds: int) -> list[str]:
    """The measured runs in order: every side once per round, alternated (A, B, A, B, ...)."""
    return [name for _ in range(rounds) for name in names]


def settings(
    a_impl: str, a_quant: str, b_impl: str, b_quant: str, a_kernels: str = "auto", b_kernels: str = "auto"
) -> list[SideSettings]:
    """A's and B's settings; the same settings twice are refused."""
    for kernels in (a_kernels, b_kernels):
        if kernels not in CPU_KERNELS:
            raise gr.Error(f"CPU kernels: {kernels!r:.40} is not one of {CPU_KERNELS}", title="CPU kernels")
    if (a_impl, quantization_value(a_quant), a_kernels) == (b_impl, quantization_value(b_quant), b_kernels):
        raise gr.Error(
            "A and B are the same settings: change the implementation, the quantization or the CPU kernels of one.",
            title="Nothing to compare",
        )
    return [SideSettings("A", a_impl, a_quant, a_kernels), SideSettings("B", b_impl, b_quant, b_kernels)]


def label(name: str, engine_impl: str, requested_impl: str, quant: str, kernels: str | None = None) -> str:
    """e.g. "A: native · int8", or "B: transformers (auto) · no quant" when auto chose the implementation;
    `kernels`: the CPU kernel path that ran ("fused" / "torch"), shown when the sides' paths are compared."""
    chosen = engine_impl + (f" ({requested_impl})" if requested_impl == "auto" else "")
    path = f" · {kernels} kernels" if kernels else ""
    return f"{name}: {chosen} · {quantization_value(quant) or 'no quant'}{path}"


def figures(sides: dict[str, Side]) -> tuple:
    """(throughput, TTFT, memory, batch) figures with one curve per side: its last round (in flight or done)."""
    ran = [s for s in sides.values() if s.rounds]
    runs = {s.label: thin(s.series) for s in ran}
    ttfts = {s.label: [r.ttft for r in s.results] for s in ran}
    return throughput_figure(runs), ttft_figure(ttfts), memory_figure(runs), batch_figure(runs)


def _fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def ratio_rows(sides: dict[str, Side]) -> list[dict[str, str]]:
    """Per rate (RATE_METRICS): each side's median over its rounds with every round's value, and B / A."""
    labels = [s.label for s in sides.values()]
    medians: dict[str, dict[str, float | None]] = {}
    rows = []
    for metric in RATE_METRICS:
        row = {"metric": f"{metric}, {RATIO_NOTE}"}
        for side in sides.values():
            values = [rates(r.results, r.series, r.wall_s)[metric] for r in side.rounds]
            known = [v for v in values if v is not None]
            median = statistics.median(known) if known else None
            medians.setdefault(side.label, {})[metric] = median
            each = " · ".join(_fmt_rate(v) for v in values)
            row[side.label] = f"{_fmt_rate(median)} ({each})" if len(values) > 1 else _fmt_rate(median)
        if len(labels) == 2:
            a, b = (medians[label].get(metric) for label in labels)
            if a and b is not None:
                row[labels[1]] += f", {b / a:.2f}× A"
        rows.append(row)
    return rows


def tables(sides: dict[str, Side], decode) -> tuple[pd.DataFrame, list[list]]:
    """The summary table (a column per side: its median round, then the rates over all rounds with B / A) and,
    when both sides ran, the token-by-token agreement rows (of their first rounds)."""
    names = list(sides)
    summaries = {}
    for i, side in enumerate(sides.values()):
        median = side.median_round()
        summary = summarize(median.results, median.series, median.wall_s)
        runs = [k + 1 for k, n in enumerate(run_order(names, len(side.rounds))) if n == names[i]]
        summary[ORDER_ROW] = f"{len(side.rounds)}: runs {', '.join(map(str, runs))}"
        summaries[side.label] = summary
    table = pd.DataFrame(summary_table(summaries), columns=["metric"] + list(summaries))
    table = pd.concat([table, pd.DataFrame(ratio_rows(sides))], ignore_index=True)
    agree = []
    if len(sides) == 2 and decode is not None:
        a, b = sides.values()
        agree = agreement_rows(a.rounds[0].results, b.rounds[0].results, decode)
    return table, agree


def unsteady(sides: dict[str, Side]) -> list[str]:
    """The sides whose greedy rounds did not all give the same tokens (they should)."""
    out = []
    for name, side in sides.items():
        first = [r.token_ids for r in side.rounds[0].results]
        if any([r.token_ids for r in rnd.results] != first for rnd in side.rounds[1:]):
            out.append(name)
    return out


def verdict(
    sides: dict[str, Side], agree: list[list], stopped: bool, warmed: tuple[str, ...] = (), order: tuple = ()
) -> str:
    """The summary line: done or stopped, whether greedy outputs agree, the two labels, and how they were measured
    (`warmed`: the names of the sides warmed up before the measured rounds; `order`: the measured runs' names in
    the order they ran)."""
    outcome = (
        "greedy outputs agree token for token"
        if agree and all(r[3] == "" for r in agree)
        else "greedy outputs differ (see the table)"
        if agree
        else "incomplete"
    )
    names = list(sides)
    rounds = max((len(s.rounds) for s in sides.values()), default=0)
    how = f"then measured in {rounds} alternated round(s): {', '.join(order or names)}"
    how += f"; the table shows each side's median round, the ratios B / A the {RATIO_NOTE}"
    if warmed:
        how = (
            f"{' and '.join(warmed)} loaded and warmed up first (an untimed run of the same prompts, "
            f"{WARMUP_TOKENS} tokens each, prefix cache forgotten after), so neither pays first-run costs; " + how
        )
    cold = [n for n in names if n not in warmed]
    if cold:
        how += f" ({', '.join(cold)} not warmed up here)"
    shaky = unsteady(sides)
    if shaky:
        how += f"; {' and '.join(shaky)}'s rounds gave different greedy tokens"
    head = f"{'**stopped**' if stopped else '**done**'}: {outcome}  \n"
    return head + " vs ".join(s.label for s in sides.values()) + f"  \n_{how}._"
