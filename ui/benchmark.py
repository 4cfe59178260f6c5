"""The Benchmark tab: `python -m backend.tools.bench` run from the app.

Our engine (native and transformers) against transformers' own `generate()` and `generate_batch()` on the
same seeded prompts, reported as ratios. The workloads, runners and table rows are backend/tools/bench.py's, so
the app shows the numbers the CLI prints. The runs happen in a worker thread, one system at a time; the
table and the bar chart update as each run finishes and Stop takes effect between runs.
"""

from __future__ import annotations

import hashlib
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd

from backend.tools import bench
from ui.plots import bench_figure
from ui.tables import column_widths

WORKLOAD_CHOICES = [
    ("throughput (all requests at once)", "throughput"),
    ("latency (batch 1)", "latency"),
    ("shared prefix (one long system prompt)", "shared_prefix"),
]
SYSTEM_CHOICES = [
    ("our engine · native", "flab-native"),
    ("our engine · transformers", "flab-transformers"),
    ("HF generate()", "hf-generate"),
    ("HF generate_batch()", "hf-generate_batch"),
]
TABLE_HEADERS = bench.TABLE_HEADERS
# longest data word per column ("shared_prefix", "flab-transformers", "1234.5"): wider than its place, the table
# scrolls as a whole
TABLE_WIDTHS = column_widths(
    TABLE_HEADERS,
    {"workload": 13, "system": 17, "output tok/s": 7, "total tok/s": 7, "peak RSS": 6, "TTFT ms": 6, "decode tok/s": 7},
)
MAX_REQUESTS = 64
MAX_REPEAT = 5
_DONE = object()


@dataclass
class ReportFiles:
    """Where the JSON downloads go: one folder for the process (made on first use in the system's temp directory,
    a place Gradio may serve files from; removed when the process exits), one file per browser session (its next
    run replaces it), the files of the `keep` most recent sessions (an older session's folder is removed).

    Gradio copies a file it offers for download into its own cache (GRADIO_TEMP_DIR) when the update is sent, so
    replacing or removing ours afterwards leaves a download already offered intact."""

    keep: int = 16
    _folder: tempfile.TemporaryDirectory | None = field(default=None, init=False, repr=False)
    _recent: OrderedDict[str, None] = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def root(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="flab-bench-")
            return Path(self._folder.name)

    def path_for(self, session: str) -> Path:
        """The file for browser session `session`'s report; the oldest session's folder goes beyond `keep`."""
        root = self.root
        name = hashlib.sha256(session.encode()).hexdigest()[:16]  # a session hash, safe as a folder name
        with self._lock:
            self._recent.pop(name, None)
            self._recent[name] = None
            while len(self._recent) > max(1, self.keep):
                old, _ = self._recent.popitem(last=False)
                shutil.rmtree(root / old, ignore_errors=True)
        folder = root / name
        folder.mkdir(exist_ok=True)
        return folder / "benchmark.json"

    def files(self) -> list[Path]:
        """Every report kept now."""
        return sorted(self.root.glob("*/*.json"))


def bars(results: list[bench.Result], rows: list[list[str]]) -> list[tuple[str, str, float, str]]:
    """(workload, system, output tok/s, ratio to HF generate) for the bar chart, from the table rows."""
    ratio_col = TABLE_HEADERS.index("vs HF generate")
    return [
        (r.workload, r.system, r.output_tok_s, row[ratio_col] if row[ratio_col] != "-" else "")
        for r, row in zip(results, rows)
        if r.error is None
    ]


def validate(workloads: list[str] | None, systems: list[str] | None, num_requests, repeat) -> tuple[int, int]:
    if not workloads:
        raise gr.Error("Pick at least one workload.", title="Nothing to run")
    if not systems:
        raise gr.Error("Pick at least one system.", title="Nothing to run")
    n, r = int(num_requests or 0), int(repeat or 0)
    if not 1 <= n <= MAX_REQUESTS:
        raise gr.Error(f"The number of requests must be between 1 and {MAX_REQUESTS}, got {n}.")
    if not 1 <= r <= MAX_REPEAT:
        raise gr.Error(f"Repeats must be between 1 and {MAX_REPEAT}, got {r}.")
    return n, r


def _views(results: list[bench.Result], setup: bench.Setup) -> tuple:
    """(bar figure, results table) of the median runs so far."""
    rows = bench.table_rows(results, setup.bandwidth)
    return bench_figure(bars(results, rows)), pd.DataFrame(rows, columns=TABLE_HEADERS)


def _worker(
    setup: bench.Setup, systems: list[str], opts: bench.BenchOptions, out: queue.Queue, stop: Callable[[], bool]
) -> None:
    try:
        for result in bench.run_all(setup, systems, opts, stop):
            out.put(result)
    except BaseException as e:  # handed to the UI thread, which raises it as a gr.Error
        out.put(e)
    finally:
        out.put(_DONE)


def run(
    setup: bench.Setup,
    systems: list[str],
    opts: bench.BenchOptions,
    cancel: threading.Event,
    report_path: Path,
    update_s: float = 1.0,
    note: str = "",
) -> Iterator[tuple]:
    """Yield (status markdown, bar figure, results table, JSON file) while the runs go on: a status line every
    `update_s`, the figure and table after each finished run, the JSON of every number at the end, written to
    `report_path` (the app's: ReportFiles.path_for(session)).
    `cancel` stops between runs."""
    schedule = [(wl.name, s) for wl in setup.workloads for _ in range(opts.repeat) for s in systems]
    out: queue.Queue = queue.Queue()
    worker = threading.Thread(
        target=_worker, args=(setup, systems, opts, out, cancel.is_set), daemon=True, name="flab-benchmark"
    )
    runs: list[bench.Result] = []
    start = run_start = time.perf_counter()
    worker.start()
    try:
        while True:
            try:
                item = out.get(timeout=update_s)
            except queue.Empty:
                workload, system = schedule[min(len(runs), len(schedule) - 1)]
                stopping = " — stopping after this run" if cancel.is_set() else ""
                yield (
                    f"**Running** {system} on {workload} ({len(runs) + 1}/{len(schedule)}), "
                    f"{time.perf_counter() - run_start:.0f} s{stopping}",
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                )
                continue
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            runs.append(item)
            run_start = time.perf_counter()
            yield (f"**{len(runs)}/{len(schedule)} runs** done",) + _views(bench.medians(runs), setup) + (gr.skip(),)
        results = bench.medians(runs)
        options = dict(asdict(opts), systems=systems, workloads=[wl.name for wl in setup.workloads], model=setup.label)
        report = bench.write_json(report_path, setup, results, options)
        failed = [f"{r.system} on {r.workload}: {r.error}" for r in results if r.error]
        verdict = "**stopped**" if cancel.is_set() and len(runs) < len(schedule) else "**done**"
        lines = [
            f"{verdict}: {len(runs)}/{len(schedule)} runs in {time.perf_counter() - start:.0f} s. {note}".strip(),
            f"`{setup.header()}`",
        ] + [f"failed: {f}" for f in failed]
        yield ("  \n".join(lines),) + _views(results, setup) + (str(report),)
    finally:
        cancel.set()  # also when the page went away and the generator was closed: the worker stops after its run
