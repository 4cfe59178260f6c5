"""Plotly figure builders: pure functions from engine measurements to figures (no Gradio, no engine).

Inputs are `Series` (per-run columns derived from StepStats) keyed by a run label, so the same builders draw
one live run or several runs overlaid (Compare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import plotly.graph_objects as go

PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"]
DASHES = ["solid", "dash", "dot", "dashdot"]
MIB = 2**20
PLOT_MIN_WIDTH = 420  # px: the app lays plots side by side only where each gets this much (ui/layout.py)
TITLE_CHARS = 46  # a title line that fits PLOT_MIN_WIDTH at 14 px; longer facts go on note lines
LEGEND_ROW_PX = 20
# a title's first line at the top of the figure, its note lines below it inside the top margin (plotly centres a
# title of several lines on its anchor otherwise, and the notes run into the plot)
TITLE_PLACE = dict(x=0.01, y=1.0, yref="container", yanchor="top", pad=dict(t=10))


@dataclass
class Series:
    """Columns over engine steps, time in seconds since the run started."""

    time: list[float] = field(default_factory=list)
    duration: list[float] = field(default_factory=list)
    prefill_tokens: list[int] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    kv_blocks_used: list[int] = field(default_factory=list)
    kv_blocks_total: list[int] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    kv_allocated: list[int] = field(default_factory=list)
    kv_used: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    cuda_allocated: list[int] = field(default_factory=list)
    cuda_reserved: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.time)


def series_from_stats(stats, t0: float = 0.0) -> Series:
    """StepStats (or their dicts) -> Series; `t0` is the run start on the engine's clock."""
    s = Series()
    for st in stats:
        d = st if isinstance(st, dict) else st.to_dict()
        m = d["memory"]
        s.time.append(d["time"] - t0)
        s.duration.append(d["duration"])
        s.prefill_tokens.append(d["prefill_tokens"])
        s.decode_tokens.append(d["decode_tokens"])
        s.batch_size.append(d["batch_size"])
        s.waiting.append(d["num_waiting"])
        s.kv_blocks_used.append(d["kv_blocks_used"])
        s.kv_blocks_total.append(d["kv_blocks_total"])
        s.weights.append(m["weights_bytes"])
        s.kv_allocated.append(m["kv_cache_bytes"])
        s.kv_used.append(m["kv_used_bytes"])
        s.rss.append(m["rss_bytes"])
        s.cuda_allocated.append(m.get("cuda_allocated_bytes", 0))
        s.cuda_reserved.append(m.get("cuda_reserved_bytes", 0))
    return s


def rolling_rate(
    time: list[float], duration: list[float], counts: list[int], window: float | None = None
) -> list[float]:
    """Tokens per second over a trailing time window ending at each step (smooths per-step noise).

    The window defaults to a tenth of the run (between 50 ms and 1 s). At the start it shrinks to the
    time elapsed since the first step began, so the first points are not inflated."""
    if not time:
        return []
    start = time[0] - duration[0]
    if window is None:
        window = min(1.0, max(0.05, (time[-1] - start) / 10))
    rates, lo, total = [], 0, 0
    for hi, t in enumerate(time):
        total += counts[hi]
        while time[lo] <= t - window + 1e-9:  # steps that ended before the window
            total -= counts[lo]
            lo += 1
        span = min(window, t - start)
        rates.append(total / span if span > 0 else 0.0)
    return rates


def title_text(title: str, notes: list[str] | tuple[str, ...] = ()) -> str:
    """A plot title: the main line, then each note on a line of its own in a smaller grey font (plotly does not
    wrap titles, so every line is kept short enough for a plot PLOT_MIN_WIDTH wide)."""
    lines = [title] + [f'<span style="font-size:11px;color:#6b7280">{n}</span>' for n in notes]
    return "<br>".join(lines)


def legend_rows(names: list[str], width: int = PLOT_MIN_WIDTH) -> int:
    """How many rows a horizontal legend of `names` takes in a plot `width` px wide (11 px font: about 6.2 px
    a character plus the swatch), packed left to right as plotly packs them."""
    rows, used = 0, width
    for name in names:
        w = 40 + 6.2 * len(name)
        if used + w > width - 20:
            rows, used = rows + 1, 0
        used += w
    return rows


def _layout(
    fig: go.Figure, title: str, xaxis: str, yaxis: str, height: int = 320, notes: list[str] | tuple = ()
) -> go.Figure:
    """Common look. The legend sits below the plot and is never scrolled (maxheight: the whole figure): the
    figure grows by the legend's rows instead, so the plot area keeps its height."""
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    shown = bool(names) and fig.layout.showlegend is not False
    rows = legend_rows(names) if shown else 0
    fig.update_layout(
        title=dict(text=title_text(title, notes), font=dict(size=14), **TITLE_PLACE),
        height=height + rows * LEGEND_ROW_PX,
        template="plotly_white",
        margin=dict(l=55, r=10, t=40 + 16 * len(notes), b=10),
        xaxis_title=xaxis,
        yaxis_title=yaxis,
        uirevision=title,
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0, font=dict(size=11), maxheight=1.0),
    )
    fig.update_xaxes(title_standoff=4)
    return fig


def _run_name(label: str) -> str:
    """A run's short name in an overlaid legend: "A" of "A: native · int8" (the full label is in the hover)."""
    return label.split(":", 1)[0].strip() or label


def _blank_axes(fig: go.Figure, text: str) -> None:
    """An empty figure: the note in the middle, no axes (plotly would draw a meaningless -1..4 range)."""
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(color="#6b7280"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)


def _empty_note(fig: go.Figure, runs: dict) -> None:
    if not any(len(s) for s in runs.values()):
        _blank_axes(fig, "no steps yet: load a model and generate")


def _style(run_idx: int, trace_idx: int, overlay: bool) -> dict:
    """Single run: colour per curve. Several runs: colour per run, dash per curve."""
    if overlay:
        return dict(color=PALETTE[run_idx % len(PALETTE)], dash=DASHES[trace_idx % len(DASHES)])
    return dict(color=PALETTE[trace_idx % len(PALETTE)], dash="solid")


def _name(label: str, curve: str, overlay: bool) -> str:
    return f"{_run_name(label)}: {curve}" if overlay else curve


def throughput_figure(runs: dict[str, Series], window: float | None = None) -> go.Figure:
    """Prefill and decode tokens/s over time, smoothed over a trailing window; the raw per-step rates (tokens of
    the step / its duration) are there too, hidden until clicked in the legend."""
    fig = go.Figure()
    overlay = len(runs) > 1
    for r, (label, s) in enumerate(runs.items()):
        for c, (curve, counts) in enumerate((("decode tok/s", s.decode_tokens), ("prefill tok/s", s.prefill_tokens))):
            fig.add_trace(
                go.Scatter(
                    x=s.time,
                    y=rolling_rate(s.time, s.duration, counts, window),
                    mode="lines",
                    name=_name(label, curve, overlay),
                    line=_style(r, c, overlay),
                    legendgroup=f"{label}{c}",
                )
            )
            fig.add_trace(
                go.Scatter(
                    x=s.time,
                    y=[n / d if d > 0 else None for n, d in zip(counts, s.duration)],
                    mode="markers",
                    marker=dict(size=3, color=_style(r, c, overlay)["color"], opacity=0.5),
                    name=_name(label, curve.replace("tok/s", "per step (raw)"), overlay),
                    visible="legendonly",
                    legendgroup=f"{label}{c}",
                )
            )
    _empty_note(fig, runs)
    return _layout(
        fig, "Throughput (tokens/s, smoothed)", "time (s)", "tokens/s", notes=["raw per step: click it in the legend"]
    )


def bench_figure(bars: list[tuple[str, str, float, str]]) -> go.Figure:
    """Benchmark: (workload, system, output tok/s, note) -> bars grouped by workload, one colour per system;
    the note (the ratio to HF generate) is written on the bar."""
    fig = go.Figure()
    systems = list(dict.fromkeys(system for _, system, _, _ in bars))
    for i, system in enumerate(systems):
        mine = [b for b in bars if b[1] == system]
        fig.add_trace(
            go.Bar(
                x=[b[0] for b in mine],
                y=[b[2] for b in mine],
                text=[b[3] for b in mine],
                textposition="outside",
                cliponaxis=False,  # the ratio above the tallest bar stays visible
                name=system,
                marker_color=PALETTE[i % len(PALETTE)],
            )
        )
    fig.update_layout(barmode="group")
    notes = ["ratio to HF generate on the bar"]
    fig = _layout(fig, "Output tokens/s", "workload", "output tok/s", height=380, notes=notes)
    if not bars:
        _blank_axes(fig, "no runs yet: pick workloads and systems, then Run benchmark")
    else:
        fig.update_yaxes(range=[0, max(b[2] for b in bars) * 1.18])  # room for the labels
        fig.update_layout(margin=dict(t=66))
    return fig


def ttft_figure(ttfts: dict[str, list[float | None]]) -> go.Figure:
    """Time to first token per request (bars; grouped by run when several)."""
    fig = go.Figure()
    for r, (label, values) in enumerate(ttfts.items()):
        xs = [f"#{i}" for i, v in enumerate(values) if v is not None]
        ys = [v * 1000 for v in values if v is not None]
        fig.add_trace(
            go.Bar(
                x=xs,
                y=ys,
                name=label,
                marker_color=PALETTE[r % len(PALETTE)],
                hovertemplate="request %{x}: %{y:.1f} ms<extra>" + label + "</extra>",
            )
        )
    fig.update_layout(barmode="group", showlegend=len(ttfts) > 1)
    fig = _layout(fig, "Time to first token", "request", "ms")
    if not any(v is not None for values in ttfts.values() for v in values):
        _blank_axes(fig, "no first token yet")
    return fig


def batch_figure(runs: dict[str, Series]) -> go.Figure:
    """Running batch size and waiting queue per step, over time."""
    fig = go.Figure()
    overlay = len(runs) > 1
    for r, (label, s) in enumerate(runs.items()):
        fig.add_trace(
            go.Scatter(
                x=s.time,
                y=s.batch_size,
                mode="lines",
                line_shape="hv",
                name=_name(label, "batch size", overlay),
                line=_style(r, 0, overlay),
            )
        )
        fig.add_trace(
            go.Scatter(
                x=s.time,
                y=s.waiting,
                mode="lines",
                line_shape="hv",
                name=_name(label, "waiting", overlay),
                line=_style(r, 1, overlay),
            )
        )
    _empty_note(fig, runs)
    return _layout(fig, "Batch size (continuous batching)", "time (s)", "requests")


def log_ticks(values: list[float]) -> tuple[list[float], list[str]]:
    """Tick positions and labels for a log axis over `values` (MiB): 1-2-5 steps over a narrow range, powers of
    ten only over a wide one, never plotly's crowded minor labels ("5 2" between decades)."""
    positive = [v for v in values if v and v > 0]
    if not positive:
        return [], []
    lo, hi = min(positive), max(positive)
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    steps = (1,) if last - first > 2 else (1, 2, 5)
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in steps]
    ticks = [t for t in ticks if lo / 2.5 <= t <= hi * 2.5]
    return ticks, [f"{t:g}" for t in ticks]


def memory_figure(runs: dict[str, Series]) -> go.Figure:
    """Weights, KV cache used vs allocated, process RSS, and CUDA allocated/reserved when on a GPU (MiB)."""
    fig = go.Figure()
    overlay = len(runs) > 1
    constant = []
    shown: list[float] = []
    for r, (label, s) in enumerate(runs.items()):
        curves = [("weights", s.weights), ("KV allocated", s.kv_allocated), ("KV used", s.kv_used), ("RSS", s.rss)]
        if overlay:  # weights and KV allocated do not change during a run: in the title, not four legend lines
            curves = [c for c in curves if c[0] in ("KV used", "RSS")]
            if len(s):
                constant.append(
                    f"{_run_name(label)}: weights {s.weights[-1] / MIB:.1f}, KV {s.kv_allocated[-1] / MIB:.1f} MiB"
                )
        if any(s.cuda_allocated) or any(s.cuda_reserved):
            curves += [("CUDA allocated", s.cuda_allocated), ("CUDA reserved", s.cuda_reserved)]
        for c, (curve, values) in enumerate(curves):
            line = dict(color=PALETTE[c % len(PALETTE)], dash=DASHES[r % len(DASHES)])
            ys = [v / MIB if v else None for v in values]
            shown += [y for y in ys if y]
            fig.add_trace(go.Scatter(x=s.time, y=ys, mode="lines", line=line, name=_name(label, curve, overlay)))
    ticks, labels = log_ticks(shown)
    # weights, KV and RSS differ by orders of magnitude on small models
    fig.update_yaxes(type="log", tickmode="array" if ticks else "auto", tickvals=ticks, ticktext=labels)
    fig = _layout(fig, "Memory (MiB, log scale)", "time (s)", "MiB", notes=constant)
    _empty_note(fig, runs)
    return fig


# --- KV cache block view ---------------------------------------------------------------------------

KV_FREE, KV_CACHED, KV_SHARED, KV_ORPHAN, KV_OWNER0 = 0, 1, 2, 3, 4
KV_STATE_COLORS = {KV_FREE: "#f3f4f6", KV_CACHED: "#a7f3d0", KV_SHARED: "#facc15", KV_ORPHAN: "#9ca3af"}
KV_STATE_NAMES = {
    KV_FREE: "free",
    KV_CACHED: "free, cached prefix (reusable)",
    KV_SHARED: "shared prefix (ref > 1)",
    KV_ORPHAN: "held (no running owner)",
}
KV_IMAGE = KV_OWNER0 + len(PALETTE)  # a block of one request that holds image features (KVBlock.image_tokens)
KV_IMAGE_COLOR = "#f0abfc"
KV_IMAGE_NAME = "holds image features"
MAX_CELLS = 4096
ZOOM_MIN = 1024  # caches larger than this are drawn up to their used range


def kv_block_state(entry) -> int:
    """Category of one kv_cache_view() entry (see KV_* constants); owners map to KV_OWNER0 + owner % 10."""
    ref, owners = entry.ref_count, entry.owners
    if ref <= 0:
        return KV_CACHED if entry.cached else KV_FREE
    if ref > 1 or len(owners) > 1:
        return KV_SHARED
    if not owners:
        return KV_ORPHAN
    return KV_OWNER0 + owners[0] % len(PALETTE)


def image_tokens(entry) -> int:
    """Image placeholder tokens a kv_cache_view() entry holds (0 for an engine without the field)."""
    return int(getattr(entry, "image_tokens", 0) or 0)


def _discrete_colorscale() -> list:
    colors = [KV_STATE_COLORS[i] for i in range(KV_OWNER0)] + PALETTE + [KV_IMAGE_COLOR]
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def kv_grid_shape(num_cells: int) -> tuple[int, int]:
    cols = 16 if num_cells <= 256 else 32 if num_cells <= 1024 else 64
    return max(1, math.ceil(num_cells / cols)), cols


def kv_zoom(view: list, min_shown: int = ZOOM_MIN) -> int:
    """How many leading blocks to draw: all of a small cache; on a large one the used range (the allocator
    hands out low block numbers first), at least `min_shown`: the rest is free and only counted."""
    n = len(view)
    if n <= min_shown:
        return n
    last = max((e.block for e in view if e.ref_count > 0 or e.cached or e.owners), default=-1)
    return min(n, max(min_shown, -(-(last + 1) // 64) * 64))


def kv_cache_figure(view: list, title: str = "KV cache blocks", note: str | None = None) -> go.Figure:
    """A grid with one cell per block (or per group of blocks on large caches): who owns it, shared, cached.
    A large cache is shown up to its used range (kv_zoom); the legend counts every block. `note`: a line under
    the title (e.g. when the view was taken)."""
    counts = {KV_FREE: 0, KV_CACHED: 0, KV_SHARED: 0, KV_ORPHAN: 0, "owned": 0}
    for e in view:
        st = kv_block_state(e)
        counts[st if st < KV_OWNER0 else "owned"] += 1
    image_blocks = sum(1 for e in view if image_tokens(e) and kv_block_state(e) >= KV_OWNER0)
    total = len(view)
    view = view[: kv_zoom(view)]
    n = len(view)
    group = max(1, math.ceil(n / MAX_CELLS))
    cells = math.ceil(n / group) if n else 0
    rows, cols = kv_grid_shape(cells) if cells else (1, 1)
    z = [[None] * cols for _ in range(rows)]
    text = [[""] * cols for _ in range(rows)]
    label = [[""] * cols for _ in range(rows)]
    for c in range(cells):
        chunk = view[c * group : (c + 1) * group]
        states = [kv_block_state(e) for e in chunk]
        state = max(states, key=lambda s: (s >= KV_OWNER0, s == KV_SHARED, s == KV_ORPHAN, s == KV_CACHED))
        owners = sorted({o for e in chunk for o in e.owners})
        images = sum(image_tokens(e) for e in chunk if e.ref_count > 0)
        if images and state >= KV_OWNER0:  # one request's block: image colour (the owner stays the cell's number)
            state = KV_IMAGE
        row, col = divmod(c, cols)
        z[row][col] = state + 0.5  # cell centre of its colour band
        first, last = chunk[0].block, chunk[-1].block
        where = f"block {first}" if group == 1 else f"blocks {first}–{last}"
        who = ("requests " + ", ".join(map(str, owners))) if owners else KV_STATE_NAMES.get(state, "")
        refs = max(e.ref_count for e in chunk)
        cached = "<br>cached prefix" if any(e.cached for e in chunk) else ""
        image = f"<br>image features: {images} token(s)" if images else ""
        text[row][col] = f"{where}<br>{who}<br>ref_count {refs}{cached}{image}"
        label[row][col] = ",".join(map(str, owners[:2])) if owners and cells <= 512 else ""
    fig = go.Figure(
        go.Heatmap(
            z=z,
            text=label,
            customdata=text,
            texttemplate="%{text}",
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=_discrete_colorscale(),
            zmin=0,
            zmax=KV_IMAGE + 1,
            showscale=False,
            xgap=1,
            ygap=1,
        )
    )
    for state in (KV_FREE, KV_CACHED, KV_SHARED, KV_ORPHAN):  # legend entries
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"{KV_STATE_NAMES[state]} ({counts[state]})",
                marker=dict(size=10, symbol="square", color=KV_STATE_COLORS[state]),
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            name=f"owned by one request ({counts['owned']})",
            marker=dict(size=10, symbol="square", color=PALETTE[0]),
        )
    )
    if image_blocks:
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=f"{KV_IMAGE_NAME} ({image_blocks})",
                marker=dict(size=10, symbol="square", color=KV_IMAGE_COLOR),
            )
        )
    notes = [f"{total:,} blocks" + (f", one cell = {group} blocks" if group > 1 else "")]
    if n < total:
        notes.append(f"showing 0–{n - 1:,}; the later ones are free")
    notes.append("number in a cell = owner request id")
    if note:
        notes.insert(0, note)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    fig.update_layout(
        title=dict(text=title_text(title, notes), font=dict(size=14), **TITLE_PLACE),
        template="plotly_white",
        height=max(220, min(620, 60 + rows * 16)) + 16 * len(notes),
        margin=dict(l=10, r=10, t=40 + 16 * len(notes), b=10),
        legend=dict(orientation="h", y=-0.02, yanchor="top", x=0, maxheight=1.0),
        uirevision="kv",
    )
    if not n:
        fig.add_annotation(text="no engine loaded", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig
