"""The Benchmark tab: backend/tools/bench.py from the app (its runs and views: ui/benchmark.py). The lab's engine
is closed first (every system loads the model itself) and loaded again at the end, also after an error or Stop."""

from __future__ import annotations

import gradio as gr

from backend.hosting import check_benchmark
from ui import benchmark
from ui.common import hub_module, progress_adapter, quantization_value, session_key
from ui.errors import status_errors
from ui.lab.loading import Loader, hosted_model
from ui.lab.state import LabState
from ui.numbers import checked
from ui.panel import PANEL_NUMBERS, to_engine

CLOSED = (
    "**The benchmark closed the lab's engine** to free memory (each system loads the model itself); "
    "it is loaded again when the benchmark ends."
)


class BenchmarkTab:
    """What the Benchmark button calls. `reports`: the JSON downloads, one folder for the process."""

    def __init__(self, state: LabState, loader: Loader, reports: benchmark.ReportFiles | None = None) -> None:
        self.state = state
        self.loader = loader
        self.reports = reports or benchmark.ReportFiles()

    @status_errors("benchmarking", outputs=5, status=0)
    def benchmark(
        self,
        choice,
        dtype,
        device,
        quant,
        max_len,
        trust_remote_code,
        workloads,
        systems,
        num_requests,
        repeat,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Yields (status, bar figure, results table, JSON file, load status)."""
        from backend.tools.bench import BenchOptions, prepare

        state = self.state
        check_benchmark(state.policy)
        checked(num_requests=num_requests, repeat=repeat)
        PANEL_NUMBERS["max_model_len"].check(max_len)
        n, reps = benchmark.validate(workloads, systems, num_requests, repeat)
        key = session_key(request)
        state.refuse_if_others_run(key, "The benchmark")
        previous = state.session.spec
        restored = False
        try:
            with state.run(key) as handle:
                hosted = hosted_model(state, choice, trust_remote_code)
                path = str(
                    hub_module().resolve_model(
                        hosted.model, progress=progress_adapter(progress), allow_local=hosted.allow_local_paths
                    )
                )
                state.session.close()
                opts = BenchOptions(
                    dtype=dtype or "auto",
                    device=device or "auto",
                    quantization=quantization_value(quant),
                    max_model_len=to_engine("max_model_len", max_len),
                    num_requests=n,
                    repeat=reps,
                    trust_remote_code=hosted.remote_code.trust,
                )
                yield "**Preparing**: seeded workloads, memory bandwidth…", gr.skip(), gr.skip(), gr.skip(), CLOSED
                setup = prepare(path, list(workloads), opts, label=hosted.model)
                note = (
                    f"Quantization {opts.quantization} applies to our engine only; the HF baselines run the "
                    "checkpoint as it is."
                    if opts.quantization
                    else ""
                )
                report = self.reports.path_for(key)
                update_s = max(state.update_s, 1.0)
                for update in benchmark.run(setup, list(systems), opts, handle.cancel, report, update_s, note):
                    yield update + (gr.skip(),)
                load_status = self.loader.restore(previous, "the benchmark")
                restored = True
                yield (gr.skip(),) * 4 + (load_status or "No engine loaded: press Load.",)
        finally:
            if not restored:
                self.loader.restore_quietly(previous, "the benchmark")
