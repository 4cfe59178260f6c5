"""Run summaries and output agreement: pure functions over a finished run (tables for the UI)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ui.fmt import fmt_bytes
from ui.plots import Series


@dataclass
class RequestResult:
    index: int
    prompt: str
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    ttft: float | None = None  # seconds
    latency: float | None = None  # seconds
    error: str | None = None
    request_id: int | None = None
    max_new: int | None = None  # the request's max new tokens (to tell a context stop from a length stop)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids or [])

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        return self.finish_reason or ("running" if self.num_tokens else "waiting")  # waiting: no token yet


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}{unit}"


def _mib(value: float | None) -> str:
    return fmt_bytes(value)


RATE_METRICS = {  # the rates a run is measured by (summarize's rows of the same names); Compare's ratios
    "output tok/s (wall)": "higher",
    "decode tok/s (decode-only steps)": "higher",
    "prefill tok/s": "higher",
    "TTFT mean (ms)": "lower",
}


def rates(results: list[RequestResult], series: Series, wall_s: float) -> dict[str, float | None]:
    """A run's rates as numbers (RATE_METRICS; None where the run has none)."""
    ttfts = [r.ttft for r in results if r.ttft is not None]
    out_tokens = sum(r.num_tokens for r in results)
    decode_steps = [i for i in range(len(series)) if series.prefill_tokens[i] == 0 and series.decode_tokens[i] > 0]
    prefill_steps = [i for i in range(len(series)) if series.prefill_tokens[i] > 0]
    decode_time = sum(series.duration[i] for i in decode_steps)
    prefill_time = sum(series.duration[i] for i in prefill_steps)
    return {
        "output tok/s (wall)": out_tokens / wall_s if wall_s > 0 else None,
        "decode tok/s (decode-only steps)": (
            sum(series.decode_tokens[i] for i in decode_steps) / decode_time if decode_time else None
        ),
        "prefill tok/s": sum(series.prefill_tokens[i] for i in prefill_steps) / prefill_time if prefill_time else None,
        "TTFT mean (ms)": statistics.fmean(ttfts) * 1000 if ttfts else None,
    }


def summarize(results: list[RequestResult], series: Series, wall_s: float) -> dict[str, str]:
    """Headline numbers of one run, as display strings (ordered)."""
    ttfts = [r.ttft for r in results if r.ttft is not None]
    out_tokens = sum(r.num_tokens for r in results)
    rate = rates(results, series, wall_s)
    ends = [(r, r.latency if r.latency is not None else wall_s) for r in results]  # a stopped run has no latency
    per_request = [
        (r.num_tokens - 1) / (end - r.ttft)
        for r, end in ends
        if r.ttft is not None and r.num_tokens > 1 and end > r.ttft
    ]
    peak = lambda values: max(values) if values else None  # noqa: E731
    count = lambda *statuses: sum(r.status in statuses for r in results)  # noqa: E731
    rows = {
        "requests": f"{len(results)} ({count('stop', 'length')} done, {count('abort')} stopped, "
        f"{count('error')} failed)",
        "generated tokens": f"{out_tokens:,}",
        "wall time": _fmt(wall_s, " s", 2),
        "TTFT mean / max": (f"{statistics.fmean(ttfts) * 1000:,.1f} / {max(ttfts) * 1000:,.1f} ms" if ttfts else "—"),
        "decode tok/s (decode-only steps)": _fmt(rate["decode tok/s (decode-only steps)"]),
        "decode tok/s per request (mean)": _fmt(statistics.fmean(per_request) if per_request else None),
        "prefill tok/s": _fmt(rate["prefill tok/s"]),
        "output tok/s (wall)": _fmt(rate["output tok/s (wall)"]),
        "engine steps": f"{len(series):,}",
        "max batch size": str(peak(series.batch_size) or 0),
        "weights": _mib(peak(series.weights)),
        "KV cache allocated": _mib(peak(series.kv_allocated)),
        "peak KV used": _mib(peak(series.kv_used)),
        "peak RSS": _mib(peak(series.rss)),
    }
    if any(series.cuda_allocated):
        rows["peak CUDA allocated / reserved"] = (
            f"{_mib(peak(series.cuda_allocated))} / {_mib(peak(series.cuda_reserved))}"
        )
    return rows


def summary_table(summaries: dict[str, dict[str, str]]) -> list[list[str]]:
    """Rows [metric, run A, run B, ...] (one column per run)."""
    labels = list(summaries)
    metrics: list[str] = []
    for s in summaries.values():
        metrics += [m for m in s if m not in metrics]
    return [[m] + [summaries[label].get(m, "—") for label in labels] for m in metrics]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (or where one ends early); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement_rows(a: list[RequestResult], b: list[RequestResult], decode) -> list[list[str]]:
    """Per request: whether greedy outputs agree token for token, and where they first differ."""
    rows = []
    for ra, rb in zip(a, b):
        ta, tb = ra.token_ids or [], rb.token_ids or []
        i = first_difference(ta, tb)
        if i is None:
            verdict, where = f"identical ({len(ta)} tokens)", ""
        else:
            pa = f"{decode(ta[i : i + 1])!r} (id {ta[i]})" if i < len(ta) else "(end)"
            pb = f"{decode(tb[i : i + 1])!r} (id {tb[i]})" if i < len(tb) else "(end)"
            verdict = f"differ at token {i} of {max(len(ta), len(tb))}"
            where = f"…{decode(ta[max(0, i - 8) : i])!r} then A {pa} vs B {pb}"
        rows.append([f"#{ra.index}", ra.prompt[:40], verdict, where])
    return rows
