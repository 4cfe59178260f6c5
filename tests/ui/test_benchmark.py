"""The Benchmark tab (ui/lab/benchmark_tab.py, ui/benchmark.py): backend/tools/bench.py's harness from the app,
streamed run by run, with the CLI's table rows; Stop takes effect between runs; bad choices are refused before
anything runs; the JSON downloads stay one per browser session, in one folder."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from backend.tools import bench
from ui import defaults
from ui.benchmark import TABLE_HEADERS, ReportFiles
from ui.plots import bench_figure

ARGS = dict(
    choice=defaults.RANDOM_CHOICE,
    dtype="float32",
    device="cpu",
    quant="as in checkpoint",
    max_len=0,
    trust_remote_code=False,
    workloads=["throughput", "latency"],
    systems=list(bench.SYSTEMS),
    num_requests=3,
    repeat=1,
)


def _runs(updates: list) -> list:
    """The benchmark's own updates (the last one only restores the lab's engine: its status is a gr.skip())."""
    return [u for u in updates if isinstance(u[0], str)]


def test_benchmark_runs_every_system_and_reports_ratios(lab):
    before = lab.session.spec
    updates = list(lab.benchmark_tab.benchmark(**ARGS))
    assert "closed the lab's engine" in updates[0][4]
    assert "loaded again after the benchmark" in updates[-1][4]  # the lab's engine is back, as it was
    assert lab.session.current() is not None and lab.session.spec == before
    status, figure, table, report, _ = _runs(updates)[-1]
    assert status.startswith("**done**: 8/8 runs") and "cpu flags" in status and "dtype float32" in status
    assert list(table.columns) == TABLE_HEADERS and len(table) == 8
    assert set(zip(table["workload"], table["system"])) == {
        (w, s) for w in ("throughput", "latency") for s in bench.SYSTEMS
    }
    assert not table["output tok/s"].str.startswith("error").any()
    assert set(table[table["system"] == "hf-generate"]["vs HF generate"]) == {"1.00x"}
    assert (table[table["workload"] == "latency"]["TTFT ms"] != "-").sum() == 3  # generate_batch has no TTFT
    assert [t.name for t in figure.data] == list(bench.SYSTEMS)
    assert all(list(t.x) == ["throughput", "latency"] for t in figure.data)
    streamed = [u for u in updates[:-1] if "runs** done" in str(u[0])]
    assert [len(u[2]) for u in streamed] == list(range(1, 9))  # the table grows run by run
    data = json.loads(Path(report).read_text())  # the download: every number, as the CLI's --json
    assert data["header"] in status and data["args"]["num_requests"] == 3
    assert [(r["workload"], r["system"]) for r in data["results"]] == list(zip(table["workload"], table["system"]))
    assert all(r["outputs"] for r in data["results"])


def test_stop_takes_effect_between_runs(lab):
    updates = lab.benchmark_tab.benchmark(**dict(ARGS, workloads=["throughput"], repeat=3))
    for status, *_ in updates:
        if "1/12 runs" in str(status):
            assert "Nothing" not in lab.stop()
            break
    *_, (status, _, table, _, _) = _runs(list(updates))
    assert status.startswith("**stopped**") and 1 <= len(table) <= 2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(workloads=[]), "at least one workload"),
        (dict(systems=[]), "at least one system"),
        (dict(num_requests=0), "requests: 0 is outside the allowed range: an integer >= 1 and <= 64"),
        (dict(repeat=9), "repeats: 9 is outside the allowed range: an integer >= 1 and <= 5"),
    ],
)
def test_bad_choices_are_refused_before_anything_runs(lab, change, message):
    before = lab.session.current()
    updates = list(lab.benchmark_tab.benchmark(**dict(ARGS, **change)))
    assert len(updates) == 1 and message in updates[0][0]  # the refusal, in the status line
    assert all(u == gr.skip() for u in updates[0][1:])  # the other outputs keep what they show
    assert lab.session.current() is before  # the loaded engine was left alone


def test_reports_do_not_accumulate(lab):
    """Two runs of one browser session write one file (the second replaces the first), in the Lab's one folder
    under the system's temp directory (a place Gradio serves files from); another session gets its own."""
    small = dict(ARGS, workloads=["latency"], systems=["flab-native"], num_requests=1)
    reports = lab.benchmark_tab.reports
    first = _runs(list(lab.benchmark_tab.benchmark(**small)))[-1][3]
    Path(first).write_text("the first run's file")
    second = _runs(list(lab.benchmark_tab.benchmark(**small)))[-1][3]
    assert first == second and reports.files() == [Path(second)]
    assert json.loads(Path(second).read_text())["results"]  # replaced by the second run's numbers
    assert Path(second).is_relative_to(tempfile.gettempdir()) and Path(second).is_relative_to(reports.root)
    other = _runs(list(lab.benchmark_tab.benchmark(**small, request=SimpleNamespace(session_hash="other"))))[-1][3]
    assert other != second and reports.files() == sorted([Path(second), Path(other)])


def test_reports_keep_the_most_recent_sessions():
    reports = ReportFiles(keep=3)
    for i in range(10):
        reports.path_for(f"session-{i}").write_text(str(i))
    assert reports.path_for("session-9") == reports.path_for("session-9")  # one path per session
    assert sorted(p.read_text() for p in reports.files()) == ["7", "8", "9"]  # the oldest sessions' files went
    assert len(list(reports.root.iterdir())) == 3


def test_bench_figure_empty_and_with_bars():
    assert "no runs yet" in bench_figure([]).layout.annotations[0].text
    fig = bench_figure([("throughput", "flab-native", 20.0, "2.00x"), ("throughput", "hf-generate", 10.0, "1.00x")])
    assert [(t.name, list(t.y), list(t.text)) for t in fig.data] == [
        ("flab-native", [20.0], ["2.00x"]),
        ("hf-generate", [10.0], ["1.00x"]),
    ]
