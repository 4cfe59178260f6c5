"""Pure figure builders, summaries and text views (no Gradio server)."""

from __future__ import annotations

import pytest

from backend.core.metrics import KVBlock, MemorySnapshot, StepStats
from ui import plots, summary, views


def _stats(n: int, prefill_first: int = 20, batch: int = 4, cuda: int = 0) -> list[StepStats]:
    out = []
    for i in range(n):
        prefill = prefill_first if i == 0 else 0
        out.append(
            StepStats(
                step=i,
                time=10.0 + 0.01 * (i + 1),
                duration=0.01,
                batch_size=batch,
                prefill_tokens=prefill,
                decode_tokens=0 if i == 0 else batch,
                sampled_tokens=batch,
                tokens_per_s=0.0,
                output_tokens_per_s=0.0,
                num_running=batch,
                num_waiting=0,
                kv_blocks_used=i // 4,
                kv_blocks_total=64,
                prefix_hit_blocks=0,
                preemptions=0,
                memory=MemorySnapshot(1000, 64 * 100, (i // 4) * 100, 10**8, cuda, 2 * cuda),
            )
        )
    return out


def test_series_from_stats_shifts_time_to_the_run_start():
    s = plots.series_from_stats(_stats(5), t0=10.0)
    assert len(s) == 5 and s.time[0] == pytest.approx(0.01) and s.prefill_tokens[0] == 20
    assert s.kv_allocated[0] == 6400 and s.rss[-1] == 10**8
    assert plots.series_from_stats([st.to_dict() for st in _stats(5)], 10.0).time == s.time  # dicts work too


def test_rolling_rate_recovers_a_constant_rate():
    time = [0.01 * (i + 1) for i in range(200)]
    rates = plots.rolling_rate(time, [0.01] * 200, [4] * 200, window=0.1)
    assert rates[-1] == pytest.approx(400, rel=0.05)
    assert max(rates) == pytest.approx(400, rel=0.05)  # no spike at the start
    assert plots.rolling_rate([], [], []) == []


def test_throughput_figure_has_prefill_and_decode_and_overlays_runs():
    s = plots.series_from_stats(_stats(30), 10.0)
    fig = plots.throughput_figure({"run": s})
    shown = [t for t in fig.data if t.visible != "legendonly"]
    assert [t.name for t in shown] == ["decode tok/s", "prefill tok/s"]
    raw = [t for t in fig.data if t.visible == "legendonly"]  # raw per-step rates, one click away
    assert [t.name for t in raw] == ["decode per step (raw)", "prefill per step (raw)"]
    assert raw[0].y[5] == pytest.approx(4 / 0.01)  # 4 decode tokens in a 10 ms step
    assert len(fig.data[0].x) == 30
    overlay = plots.throughput_figure({"A": s, "B": s})
    names = [t.name for t in overlay.data if t.visible != "legendonly"]
    assert names == ["A: decode tok/s", "A: prefill tok/s", "B: decode tok/s", "B: prefill tok/s"]
    assert overlay.data[0].line.color != overlay.data[4].line.color  # one colour per run
    assert plots.throughput_figure({}).layout.annotations  # an empty plot says why


def test_memory_figure_shows_cuda_only_on_gpu():
    cpu = plots.memory_figure({"run": plots.series_from_stats(_stats(5), 10.0)})
    assert [t.name for t in cpu.data] == ["weights", "KV allocated", "KV used", "RSS"]
    gpu = plots.memory_figure({"run": plots.series_from_stats(_stats(5, cuda=5 * 2**20), 10.0)})
    assert "CUDA allocated" in [t.name for t in gpu.data] and "CUDA reserved" in [t.name for t in gpu.data]
    assert gpu.layout.yaxis.title.text == "MiB"


def test_batch_and_ttft_figures():
    fig = plots.batch_figure({"run": plots.series_from_stats(_stats(5), 10.0)})
    assert [t.name for t in fig.data] == ["batch size", "waiting"] and list(fig.data[0].y) == [4] * 5
    ttft = plots.ttft_figure({"A": [0.01, None, 0.03], "B": [0.02]})
    assert list(ttft.data[0].y) == pytest.approx([10.0, 30.0]) and list(ttft.data[0].x) == ["#0", "#2"]
    assert ttft.layout.barmode == "group"


def test_kv_block_states():
    assert plots.kv_block_state(KVBlock(block=0, owners=[], ref_count=0, cached=False)) == plots.KV_FREE
    assert plots.kv_block_state(KVBlock(block=0, owners=[], ref_count=0, cached=True)) == plots.KV_CACHED
    assert plots.kv_block_state(KVBlock(block=0, owners=[1, 2], ref_count=2, cached=True)) == plots.KV_SHARED
    assert plots.kv_block_state(KVBlock(block=0, owners=[], ref_count=1, cached=False)) == plots.KV_ORPHAN
    assert plots.kv_block_state(KVBlock(block=0, owners=[3], ref_count=1, cached=False)) == plots.KV_OWNER0 + 3


def test_kv_cache_figure_grid_and_legend():
    view = [
        KVBlock(
            block=b,
            owners=[b % 3] if b < 10 else [1, 2] if b < 12 else [],
            ref_count=1 if b < 10 else 2 if b < 12 else 0,
            cached=12 <= b < 20,
        )
        for b in range(100)
    ]
    fig = plots.kv_cache_figure(view)
    heat = fig.data[0]
    cells = [v for row in heat.z for v in row if v is not None]
    assert len(cells) == 100 and len(heat.z[0]) == 16  # 16 columns for small caches
    legend = " ".join(t.name for t in fig.data[1:])
    assert "shared prefix (ref > 1) (2)" in legend and "cached prefix (reusable) (8)" in legend
    assert "owned by one request (10)" in legend and "free (80)" in legend
    assert "block 10" in heat.customdata[0][10] and "requests 1, 2" in heat.customdata[0][10]


def test_kv_cache_figure_groups_blocks_on_large_caches():
    n = 3 * plots.MAX_CELLS
    view = [
        KVBlock(block=b, owners=[1] if b == n - 1 else [], ref_count=int(b == n - 1), cached=False) for b in range(n)
    ]
    fig = plots.kv_cache_figure(view)
    cells = [v for row in fig.data[0].z for v in row if v is not None]
    assert len(cells) == plots.MAX_CELLS and "one cell = 3 blocks" in fig.layout.title.text
    assert plots.kv_cache_figure([]).layout.annotations[0].text == "no engine loaded"


def test_kv_cache_figure_zooms_to_the_used_range_of_a_huge_cache():
    view = [
        KVBlock(block=b, owners=[b // 16] if b < 300 else [], ref_count=int(b < 300), cached=False)
        for b in range(65536)
    ]
    fig = plots.kv_cache_figure(view)
    cells = [v for row in fig.data[0].z for v in row if v is not None]
    assert len(cells) == plots.ZOOM_MIN  # one cell per block: readable, not 16 blocks a cell
    title = fig.layout.title.text
    assert "65,536 blocks" in title and "showing 0–1,023; the later ones are free" in title
    legend = " ".join(t.name for t in fig.data[1:])
    assert "owned by one request (300)" in legend and "free (65236)" in legend  # every block counted


def test_empty_figures_have_no_axes():
    for fig in (plots.throughput_figure({}), plots.ttft_figure({}), plots.batch_figure({}), plots.bench_figure([])):
        assert fig.layout.xaxis.visible is False and fig.layout.yaxis.visible is False


def test_compare_memory_legend_is_short_and_bench_labels_fit():
    s = plots.series_from_stats(_stats(10), 10.0)
    fig = plots.memory_figure({"A: native": s, "B: transformers": s})
    assert len(fig.data) == 4 and "weights" in fig.layout.title.text  # KV used + RSS per side
    bars = plots.bench_figure([("throughput", "flab-native", 100.0, "2.0x"), ("throughput", "hf", 50.0, "")])
    assert bars.data[0].cliponaxis is False and bars.layout.yaxis.range[1] > 100


def test_summary_and_agreement():
    results = [
        summary.RequestResult(0, "a", "xy", [1, 2, 3], "length", ttft=0.01, latency=0.05),
        summary.RequestResult(1, "b", "", [4], "abort", ttft=0.02),
    ]
    s = plots.series_from_stats(_stats(10), 10.0)
    rows = summary.summarize(results, s, wall_s=0.1)
    assert rows["requests"].startswith("2 (1 done, 1 stopped")
    assert rows["generated tokens"] == "4" and rows["TTFT mean / max"] == "15.0 / 20.0 ms"
    assert rows["max batch size"] == "4" and rows["decode tok/s (decode-only steps)"] == "400.0"
    table = summary.summary_table({"A": rows, "B": rows})
    assert table[0][0] == "requests" and len(table[0]) == 3
    assert summary.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert summary.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert summary.first_difference([1, 2], [1, 2, 3]) == 2
    b = [summary.RequestResult(0, "a", token_ids=[1, 9, 3]), summary.RequestResult(1, "b", token_ids=[4])]
    agree = summary.agreement_rows(results, b, decode=lambda ids: "".join(chr(96 + i) for i in ids))
    assert agree[0][2] == "differ at token 1 of 3" and "'b'" in agree[0][3] and "'i'" in agree[0][3]
    assert agree[1][2] == "identical (1 tokens)"


def test_views():
    info = dict(
        model="m",
        implementation="transformers",
        attention="flab_paged",
        injected={"attention fn": {"A": 2}},
        swapped={},
        parameters=1234567,
        weights_bytes=3 * 2**20,
        kv_cache=dict(num_blocks=8, bytes=2048),
    )
    md = views.describe_markdown(info)
    assert "| **implementation** | transformers |" in md and "| **swapped** | none |" in md
    assert "attention fn: A: 2" in md and "1,234,567 (1.23M)" in md and "3.00 MiB" in md
    assert "| **kv_cache.num_blocks** | 8 |" in md
    assert views.describe_markdown(None) == "_No engine loaded._"
    res = [summary.RequestResult(0, "hello", "world", [1, 2], "stop", ttft=0.0123)]
    assert views.result_rows(res) == [[0, "stop", 2, 12.3, "hello", "world"]]
    assert "done" in views.run_status_markdown(res, 3, True, False, 0, 8)


# --- issue 30: figures that fit a plot PLOT_MIN_WIDTH wide -----------------------------------------------


def _title_lines(fig) -> list[str]:
    import re

    return [re.sub(r"<[^>]+>", "", line) for line in fig.layout.title.text.split("<br>")]


LONG_A, LONG_B = "A: transformers (auto) · no quant", "B: native · int4"


def test_titles_fit_a_narrow_plot_and_overlaid_legends_do_not_scroll():
    s = plots.series_from_stats(_stats(30), 10.0)
    runs = {LONG_A: s, LONG_B: s}
    figures = [
        plots.throughput_figure(runs),
        plots.memory_figure(runs),
        plots.batch_figure(runs),
        plots.ttft_figure({LONG_A: [0.01], LONG_B: [0.02]}),
        plots.bench_figure([("throughput", "flab-native", 100.0, "1.0×")]),
        plots.kv_cache_figure([KVBlock(block=i, owners=[], ref_count=0, cached=False) for i in range(5000)]),
    ]
    for fig in figures:
        lines = _title_lines(fig)
        assert all(len(line) <= plots.TITLE_CHARS for line in lines), lines
        assert fig.layout.margin.t >= 40 + 16 * (len(lines) - 1)  # room for every title line
        assert fig.layout.legend.maxheight == 1.0  # the legend is never given an inner scrollbar
    memory = _title_lines(figures[1])
    assert memory[1].startswith("A: weights") and memory[2].startswith("B: weights")  # one line per side
    assert [t.name for t in figures[1].data] == ["A: KV used", "A: RSS", "B: KV used", "B: RSS"]
    single = plots.throughput_figure({"run": s})
    assert figures[0].layout.height > single.layout.height  # eight legend entries: the figure grows, not the plot
    assert plots.legend_rows(["x" * 60] * 4) == 4 and plots.legend_rows(["a", "b"]) == 1


def test_memory_axis_ticks_are_few_and_labelled():
    fig = plots.memory_figure({"run": plots.series_from_stats(_stats(30), 10.0)})
    ticks, labels = fig.layout.yaxis.tickvals, fig.layout.yaxis.ticktext
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.tickmode == "array"
    assert 2 <= len(ticks) <= 8 and len(labels) == len(ticks)
    wide, _ = plots.log_ticks([0.006, 95.0])  # four decades: powers of ten only
    assert wide == pytest.approx([0.01, 0.1, 1, 10, 100])
    narrow, text = plots.log_ticks([60.0, 310.0])  # under one decade: 1-2-5 steps
    assert narrow == pytest.approx([50, 100, 200, 500]) and text == ["50", "100", "200", "500"]
    assert plots.log_ticks([]) == ([], [])


def test_column_widths_leave_room_for_every_header_word():
    from ui import benchmark, compare, inside, tables, views

    assert tables.column_widths(["first difference", "x"], {"x": "30%"}) == [f"{tables.fit_px(10)}px", "30%"]
    assert tables.column_widths(["system"], {"system": 17}) == [f"{tables.fit_px(17)}px"]  # its data is wider
    for headers, widths in [
        (views.RESULT_HEADERS, views.RESULT_WIDTHS),
        (benchmark.TABLE_HEADERS, benchmark.TABLE_WIDTHS),
        (inside.TRACE_HEADERS, inside.TRACE_WIDTHS),
        (compare.AGREEMENT_HEADERS, compare.AGREEMENT_WIDTHS),
    ]:
        assert len(widths) == len(headers)
        for header, width in zip(headers, widths):
            if width.endswith("px"):
                assert int(width[:-2]) >= tables.fit_px(max(len(w) for w in header.split())), (header, width)
