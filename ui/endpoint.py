"""An OpenAI-compatible endpoint (backend/remote.py) as a target in the app: its stream consumer and views.

`EndpointWorkload` shares ui/workload.StreamRuns with the engine's Workload (start / stop / wait / done / wall_s;
snapshot -> (results, Series)), so the Generate and Compare tabs draw an endpoint's run with the same ui/plots.py
builders and ui/summary.py tables as our engine's:

  - a "step" of the endpoint is a burst of streamed chunks that arrive within MERGE_S of each other (the client
    cannot see the server's steps); its duration is the time since the previous burst. A request's first chunk
    counts its prompt as prefill tokens (its first token comes from the prefill, as in our engine's stats), the
    other tokens as decode tokens; batch size / waiting are the requests streaming / still waiting for their first
    token, as this client sees them;
  - memory and KV usage come from the endpoint's /metrics (vLLM / SGLang / flab gauges), sampled every
    METRICS_EVERY_S; `metrics_figure` says "not exposed" when the endpoint has none.

Hosting rule (backend/hosting): when the app is hosted, endpoints are host-only: a visitor cannot point the app at
a URL (the server would send requests wherever a stranger says), so `check_endpoint_allowed` refuses.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go

from backend.hosting import HostingError
from backend.remote import EndpointError, RemoteEndpoint
from ui.plots import PALETTE, Series, _blank_axes, _layout
from ui.summary import RequestResult
from ui.workload import StreamRuns

MERGE_S = 0.002  # chunks closer than this are one burst (one "step")
METRICS_EVERY_S = 0.5
NOT_EXPOSED = "not exposed by this endpoint's /metrics"


def check_endpoint_allowed(policy) -> None:
    """Hosted: endpoints are the host's only (a visitor's URL would make this server fetch any address)."""
    if getattr(policy, "hosted", False):
        raise HostingError(
            "an endpoint as a target is for the host only on a hosted app (it would make this server send requests "
            "to any address a visitor types); run the app on your own machine to compare with an endpoint"
        )


def connect(base_url: str, api_key: str | None = None, policy=None) -> RemoteEndpoint:
    """The endpoint at `base_url`, checked: the host allows it and GET /v1/models answers (EndpointError with the
    reason otherwise: a URL that does not answer, a wrong key, not the OpenAI API)."""
    check_endpoint_allowed(policy)
    if not (base_url or "").strip():
        raise EndpointError("type the endpoint's base URL first, e.g. http://127.0.0.1:8000/v1")
    endpoint = RemoteEndpoint(base_url.strip(), api_key=(api_key or "").strip() or None)
    endpoint.resolve_model()
    return endpoint


@dataclass
class EndpointResult(RequestResult):
    """A request streamed from an endpoint: the OpenAI API sends text, so the tokens are counted, not listed."""

    count: int = 0

    @property
    def num_tokens(self) -> int:
        return self.count


@dataclass
class MetricsSample:
    time: float  # seconds since the run started
    kv_usage: float | None  # 0..1
    num_running: float | None
    num_waiting: float | None


@dataclass
class _Arrival:
    time: float  # seconds since the run started
    index: int  # request
    count: int  # tokens in the chunk
    first: bool  # the request's first token(s)


@dataclass
class EndpointWorkload(StreamRuns):
    """Several prompts at once on an endpoint: one streaming request (thread) per prompt, plus a /metrics sampler.

    `prompt_ids`: per prompt, token ids to send instead of the text (Compare sends our tokenizer's ids, so both
    systems get the same prompt tokens); `prompt_lens`: prompt tokens per request for the prefill counts (0 when
    unknown)."""

    endpoint: RemoteEndpoint
    prompts: list[str]
    params: list
    prompt_ids: list[list[int] | None] | None = None
    prompt_lens: list[int] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    gap_s: float = 0.0
    sample_metrics: bool = True

    def __post_init__(self) -> None:
        n = len(self.prompts)
        self.params = list(self.params) if isinstance(self.params, (list, tuple)) else [self.params] * n
        self.prompt_ids = list(self.prompt_ids) if self.prompt_ids is not None else [None] * n
        self.prompt_lens = list(self.prompt_lens) if self.prompt_lens is not None else [0] * n
        self.results = [
            EndpointResult(i, p, max_new=getattr(self.params[i], "max_new_tokens", None))
            for i, p in enumerate(self.prompts)
        ]
        self.samples: list[MetricsSample] = []
        self.metrics_source: str | None = None
        self.metrics_error: str | None = None
        self._arrivals: list[_Arrival] = []
        self._sampler: threading.Thread | None = None
        self._init_runs()

    def start(self) -> EndpointWorkload:
        self.start_time = time.perf_counter()
        self._launch("ui-endpoint")
        if self.sample_metrics:
            self._sampler = threading.Thread(target=self._sample, name="ui-endpoint-metrics", daemon=True)
            self._sampler.start()
        return self

    def _now(self) -> float:
        return time.perf_counter() - self.start_time

    def _open(self, i: int):
        text = self.prompts[i] if self.prompt_ids[i] is None else None
        return self.endpoint.open_stream(text, self.params[i], prompt_token_ids=self.prompt_ids[i])

    def _take(self, i: int, delta) -> None:
        res, out = self.results[i], delta.output
        count = int(delta.extra.get("num_tokens", 0))
        if count:
            self._arrivals.append(_Arrival(self._now(), i, count, res.count == 0))
        res.count += count
        if delta.finished and delta.extra.get("total_tokens") is not None:
            res.count = int(delta.extra["total_tokens"])
        res.text, res.ttft, res.latency = out.text, out.ttft, out.latency
        res.finish_reason = out.finish_reason if delta.finished else None

    def _sample(self) -> None:
        while True:
            try:
                m = self.endpoint.metrics()
            except EndpointError as e:
                self.metrics_error = str(e)
                return
            with self._lock:
                self.metrics_source = m.source
                if m.source is not None:
                    self.samples.append(MetricsSample(self._now(), m.kv_usage, m.num_running, m.num_waiting))
            if m.source is None or self.done or self.cancel.wait(METRICS_EVERY_S):
                return

    @property
    def error(self) -> str | None:
        """The first failed request's error (e.g. the endpoint stopped answering), for the status line."""
        return next((r.error for r in self.results if r.error), None)

    def snapshot(self) -> tuple[list[EndpointResult], Series]:
        with self._lock:
            results = [EndpointResult(**vars(r)) for r in self.results]
            arrivals = list(self._arrivals)
            finished_at = {r.index: r.latency for r in self.results if r.latency is not None}
        return results, series_from_arrivals(arrivals, self.prompt_lens, finished_at)

    def metrics_snapshot(self) -> tuple[str | None, list[MetricsSample]]:
        with self._lock:
            return self.metrics_source, list(self.samples)


def series_from_arrivals(arrivals: list, prompt_lens: list[int], finished_at: dict[int, float]) -> Series:
    """Streamed chunks -> a Series of bursts (see the module docstring). `finished_at`: request -> its latency."""
    s = Series()
    arrivals = sorted(arrivals, key=lambda a: a.time)
    bursts: list[list] = []
    for a in arrivals:
        if bursts and a.time - bursts[-1][-1].time <= MERGE_S:
            bursts[-1].append(a)
        else:
            bursts.append([a])
    started: set[int] = set()
    previous = 0.0
    for burst in bursts:
        t = burst[-1].time
        prefill = decode = 0
        for a in burst:
            if a.first:
                started.add(a.index)
                prefill += prompt_lens[a.index] if a.index < len(prompt_lens) else 0
                decode += a.count - 1
            else:
                decode += a.count
        streaming = sum(1 for i in started if finished_at.get(i) is None or finished_at[i] >= t)
        s.time.append(t)
        s.duration.append(max(t - previous, 1e-9))
        s.prefill_tokens.append(prefill)
        s.decode_tokens.append(decode)
        s.batch_size.append(streaming)
        s.waiting.append(max(0, len(prompt_lens) - len(started)))
        for column in (s.kv_blocks_used, s.kv_blocks_total, s.weights, s.kv_allocated, s.kv_used, s.rss):
            column.append(0)  # not known from the client: the endpoint's /metrics figure shows what it exposes
        s.cuda_allocated.append(0)
        s.cuda_reserved.append(0)
        previous = t
    return s


def metrics_figure(source: str | None, samples: list[MetricsSample], label: str = "endpoint") -> go.Figure:
    """The endpoint's KV cache usage (%) and its running / waiting requests over time, from its /metrics; a note
    saying "not exposed" when the endpoint has no vLLM / SGLang / flab gauges."""
    fig = go.Figure()
    title = f"{label}: KV cache and queue from /metrics" + (f" ({source})" if source else "")
    curves = (
        ("KV usage %", [None if m.kv_usage is None else 100 * m.kv_usage for m in samples], "y"),
        ("running", [m.num_running for m in samples], "y2"),
        ("waiting", [m.num_waiting for m in samples], "y2"),
    )
    for c, (name, values, axis) in enumerate(curves):
        if any(v is not None for v in values):
            fig.add_trace(
                go.Scatter(
                    x=[m.time for m in samples],
                    y=values,
                    mode="lines+markers",
                    name=name,
                    yaxis=axis,
                    line=dict(color=PALETTE[c % len(PALETTE)], shape="hv"),
                )
            )
    fig = _layout(fig, title, "time (s)", "KV usage %")
    fig.update_layout(yaxis2=dict(title="requests", overlaying="y", side="right", rangemode="tozero"))
    if source is None:
        _blank_axes(fig, f"memory and KV: {NOT_EXPOSED}")
    elif not fig.data:
        _blank_axes(fig, "no /metrics sample yet")
    return fig


def text_agreement_rows(ours: list[RequestResult], theirs: list[RequestResult], decode) -> list[list[str]]:
    """Per request, our engine (A, token ids) vs the endpoint (B, text): rows [request, prompt, verdict, where],
    `where` empty when they agree. The first differing token is ours whose decoded prefix stops being a prefix of
    the endpoint's text (the endpoint's tokens are counted, not listed)."""
    rows = []
    for a, b in zip(ours, theirs):
        ids, text = a.token_ids or [], b.text or ""
        if b.error:
            rows.append([f"#{a.index}", a.prompt[:40], "the endpoint failed", b.error])
            continue
        if a.text == text and a.num_tokens == b.num_tokens:
            rows.append([f"#{a.index}", a.prompt[:40], f"identical ({a.num_tokens} tokens)", ""])
            continue
        k = 0
        while k < len(ids) and text.startswith(decode(ids[: k + 1])):
            k += 1
        if k == len(ids) and a.text == text:
            verdict, where = f"same text, {a.num_tokens} vs {b.num_tokens} tokens", "the endpoint counted differently"
        elif k == len(ids):
            verdict = f"differ after token {k} of ours (ours ended)"
            where = f"…{decode(ids[max(0, k - 8) : k])!r} then B goes on {text[len(decode(ids)) :][:30]!r}"
        else:
            done = decode(ids[:k])
            verdict = f"differ at token {k} of {len(ids)}"
            where = (
                f"…{decode(ids[max(0, k - 8) : k])!r} then A {decode(ids[k : k + 1])!r} (id {ids[k]}) "
                f"vs B {text[len(done) :][:20]!r}"
            )
        rows.append([f"#{a.index}", a.prompt[:40], verdict, where])
    return rows


def kv_peak(source: str | None, samples: list[MetricsSample]) -> str:
    """The peak KV cache usage the endpoint's /metrics reported, or "not exposed"."""
    values = [m.kv_usage for m in samples if m.kv_usage is not None]
    if source is None or not values:
        return "not exposed" if source is None else "no sample"
    return f"{100 * max(values):.1f}% ({source})"


def rename_steps(summary: dict[str, str]) -> dict[str, str]:
    """An endpoint run's summary: its "steps" are stream bursts seen by the client (the endpoint's are hidden)."""
    return {("stream bursts (client side)" if k == "engine steps" else k): v for k, v in summary.items()}


def compare_table(table: pd.DataFrame, sides: dict, wl: EndpointWorkload) -> pd.DataFrame:
    """Compare's side-by-side table with the KV usage peak of each side: ours from its steps, the endpoint's from its
    /metrics ("not exposed" when it has none)."""
    a, b = list(sides.values())[:2]
    s = a.series
    ours = [u / t for u, t in zip(s.kv_blocks_used, s.kv_blocks_total) if t]
    row = {
        "metric": "KV usage peak (/metrics for an endpoint)",
        a.label: f"{100 * max(ours):.1f}%" if ours else "—",
        b.label: kv_peak(*wl.metrics_snapshot()),
    }
    table = table.copy()
    table.loc[table["metric"] == "engine steps", b.label] = f"{len(b.series):,} stream bursts (client side)"
    return pd.concat([table, pd.DataFrame([row])], ignore_index=True)
