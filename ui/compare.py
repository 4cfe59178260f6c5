"""The Compare tab's pure parts: labels, overlaid figures, summary and agreement tables, the verdict.

`CompareTab.compare` (ui/lab/compare_tab.py) loads settings A, then B, warms each up with an untimed run of the same
prompts (WARMUP_TOKENS each, prefix cache forgotten after), runs the same greedy workload on each and streams these
views; everything here takes the finished (or in-flight) runs as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from ui.common import AGREEMENT_HEADERS, quantization_value, thin
from ui.plots import Series, batch_figure, memory_figure, throughput_figure, ttft_figure
from ui.summary import agreement_rows, summarize, summary_table
from ui.tables import column_widths

# the side-by-side table's columns are the sides' labels ("B: transformers · int8"): its longest word, 12 characters
SUMMARY_WIDTHS = column_widths(["metric", "A", "B"], {"metric": "40%", "A": 12, "B": 12})
AGREEMENT_WIDTHS = column_widths(
    AGREEMENT_HEADERS, {"prompt": "22%", "greedy outputs": "28%", "first difference": "32%"}
)
WARMUP_TOKENS = 4  # new tokens a request in a side's untimed warm-up run
ORDER_ROW = "measured (after a warm-up)"


@dataclass
class Side:
    """One side's run so far: its label for tables and legends, results, time series and wall time."""

    label: str
    results: list
    series: Series
    wall_s: float


def settings(a_impl: str, a_quant: str, b_impl: str, b_quant: str) -> list[tuple[str, str, str]]:
    """[(name, implementation, quantization choice)] for A and B; the same settings twice are refused."""
    if (a_impl, quantization_value(a_quant)) == (b_impl, quantization_value(b_quant)):
        raise gr.Error(
            "A and B are the same settings: change the implementation or the quantization of one.",
            title="Nothing to compare",
        )
    return [("A", a_impl, a_quant), ("B", b_impl, b_quant)]


def label(name: str, engine_impl: str, requested_impl: str, quant: str) -> str:
    """e.g. "A: native · int8", or "B: transformers (auto) · no quant" when auto chose the implementation."""
    chosen = engine_impl + (f" ({requested_impl})" if requested_impl == "auto" else "")
    return f"{name}: {chosen} · {quantization_value(quant) or 'no quant'}"


def figures(sides: dict[str, Side]) -> tuple:
    """(throughput, TTFT, memory, batch) figures with one curve per side."""
    runs = {s.label: thin(s.series) for s in sides.values()}
    ttfts = {s.label: [r.ttft for r in s.results] for s in sides.values()}
    return throughput_figure(runs), ttft_figure(ttfts), memory_figure(runs), batch_figure(runs)


def tables(sides: dict[str, Side], decode) -> tuple[pd.DataFrame, list[list]]:
    """The summary table (a column per side) and, when both sides ran, the token-by-token agreement rows."""
    summaries = {s.label: summarize(s.results, s.series, s.wall_s) for s in sides.values()}
    for i, summary in enumerate(summaries.values()):
        summary[ORDER_ROW] = ("1st", "2nd")[min(i, 1)]
    table = pd.DataFrame(summary_table(summaries), columns=["metric"] + list(summaries))
    agree = []
    if len(sides) == 2 and decode is not None:
        a, b = sides.values()
        agree = agreement_rows(a.results, b.results, decode)
    return table, agree


def verdict(sides: dict[str, Side], agree: list[list], stopped: bool, warmed: tuple[str, ...] = ()) -> str:
    """The summary line: done or stopped, whether greedy outputs agree, the two labels, and how they were measured
    (`warmed`: the names of the sides warmed up before their measured run)."""
    outcome = (
        "greedy outputs agree token for token"
        if agree and all(r[3] == "" for r in agree)
        else "greedy outputs differ (see the table)"
        if agree
        else "incomplete"
    )
    names = [name for name in sides]
    how = "measured in this order: " + ", then ".join(names)
    if warmed:
        how = (
            f"{' and '.join(warmed)} loaded and warmed up first (an untimed run of the same prompts, "
            f"{WARMUP_TOKENS} tokens each, prefix cache forgotten after), so neither pays first-run costs; " + how
        )
    cold = [n for n in names if n not in warmed]
    if cold:
        how += f" ({', '.join(cold)} not warmed up here)"
    head = f"{'**stopped**' if stopped else '**done**'}: {outcome}  \n"
    return head + " vs ".join(s.label for s in sides.values()) + f"  \n_{how}._"
