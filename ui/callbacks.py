"""What the Blocks call: plain methods of `Lab` (which holds the engine session), testable without a browser.

Each method takes the component values as plain Python values and returns (or yields, for live updates)
plain values and Plotly figures. Errors become gr.Error with what to do (ui/errors.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from backend.loading.memory import estimate_memory
from ui import benchmark, compare, defaults, views
from ui.common import (
    LOAD_WAIT_S,
    describe,
    hub_module,
    max_len_value,
    progress_adapter,
    quantization_value,
    session_key,
    thin,
)
from ui.errors import user_errors
from ui.plots import Series, batch_figure, kv_cache_figure, memory_figure, throughput_figure, ttft_figure
from ui.session import LoadSpec, Runs, Session
from ui.summary import summarize, summary_table
from ui.workload import Workload, split_prompts


class Lab:
    """The app's state: one engine session per process and the runs in flight per browser session."""

    def __init__(
        self, cache_root: str | Path | None = None, session: Session | None = None, update_s: float = 0.3
    ) -> None:
        self.cache_root = cache_root
        self.session = session or Session()
        self.runs = Runs()
        self.update_s = update_s
        self._connectivity = None  # hub.HubConnectivity, probed at most once a minute

    def offline(self) -> bool:
        hub = hub_module()
        if self._connectivity is None:
            self._connectivity = hub.HubConnectivity()
        return hub.is_offline(self._connectivity)

    # --- model picker ---------------------------------------------------------------------------

    def picker_note(self) -> str:
        if self.offline():
            return (
                "**Offline**: Hub search and downloads are off. Pick the built-in tiny model "
                "(random weights — for trying the app offline), a cached model, or type a local folder path."
            )
        return (
            "**Online**: search the Hub (text-generation models, most downloaded first), pick a suggested "
            "or cached model, or type a Hub id or a local folder path."
        )

    def model_choices(self) -> list[tuple[str, str]]:
        hub = hub_module()
        choices = [(defaults.DEFAULT_LABEL, defaults.DEFAULT_CHOICE)]
        try:
            cached = list(hub.list_cached_models())
        except Exception:
            cached = []
        if not self.offline():
            choices += [(f"{m}  (suggested)", m) for m in hub.SUGGESTED_MODELS if m not in cached]
        choices += [(f"{m}  (cached)", m) for m in cached]
        return choices

    def refresh_picker(self):
        return self.picker_note(), gr.Dropdown(choices=self.model_choices())

    @user_errors("searching the Hub")
    def search(self, query: str) -> list[list]:
        if self.offline():
            gr.Warning("Offline: Hub search is unavailable. Pick the built-in model, a cached model or a local folder.")
            return []
        found = hub_module().search_models((query or "").strip(), limit=20)
        if getattr(found, "error", None):
            gr.Warning(found.error)
        elif not found:
            gr.Info(f"No text-generation models found for {query!r}.")
        return views.search_rows(found)

    def search_table(self, query: str):
        """search() as a Dataframe update: shown only when there are results."""
        rows = self.search(query)
        return gr.Dataframe(value=rows, visible=bool(rows))

    def pick_search_result(self, evt: gr.SelectData) -> str:
        row = getattr(evt, "row_value", None) or []
        return row[0] if row else gr.skip()

    def suggest_kv_mb(self, choice: str) -> float:
        return defaults.suggested_kv_mb(choice)

    def estimate(self, choice: str, dtype: str, quant: str, kv_mb: float, max_len: float, max_batch: float) -> str:
        try:
            name = defaults.resolve_choice(choice, self.cache_root)
            context = max_len_value(max_len) or 4096
            est = estimate_memory(
                name,
                dtype=dtype or "auto",
                quantization=quantization_value(quant),
                context_len=context,
                num_seqs=max(1, int(max_batch or 1)),
            )
        except Exception as e:  # an estimate is advisory: say why there is none
            return f"_No memory estimate for {choice}: {e}_"
        return views.estimate_markdown(est, kv_mb)

    # --- load -----------------------------------------------------------------------------------

    def spec(
        self, choice, impl, quant, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code=False
    ) -> LoadSpec:
        return LoadSpec.make(
            defaults.resolve_choice(choice, self.cache_root),
            impl or "auto",
            quantization_value(quant),
            dtype or "auto",
            device or "auto",
            bool(trust_remote_code),
            block_size=int(block_size),
            kv_cache_memory_gb=float(kv_mb) / 1024 if kv_mb and kv_mb > 0 else None,
            max_num_seqs=int(max_batch),
            max_model_len=max_len_value(max_len),
        )

    def _refuse_if_others_run(self, key: str, what: str) -> None:
        """The engine is shared by every browser session: never close it under another user's run."""
        others = self.runs.active_elsewhere(key)
        if others:
            raise gr.Error(
                f"{what} would replace the loaded engine, which {others} run(s) of other users are "
                "using right now. Try again when they have finished.",
                title="Engine busy",
            )

    @user_errors("loading the model")
    def load(
        self,
        choice,
        impl,
        quant,
        dtype,
        device,
        kv_mb,
        block_size,
        max_batch,
        max_len,
        trust_remote_code=False,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """-> (status markdown, engine description markdown, KV block figure)."""
        progress(0, desc="resolving the model…")
        spec = self.spec(choice, impl, quant, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code)
        if self.session.spec != spec:
            self._refuse_if_others_run(session_key(request), "Loading these settings")
        engine, reused = self.session.load(spec, progress=progress_adapter(progress))
        return self._loaded_views(engine, reused, impl, quant, defaults.is_default(choice))

    def _loaded_views(self, engine, reused: bool, impl: str, quant: str, is_default: bool):
        info = describe(engine)
        if quant == "none" and info.get("quantization"):
            gr.Warning(
                f"This checkpoint is quantized ({info['quantization']}); it loads as it is "
                "(dequantizing to full precision is not supported)."
            )
        status = views.load_status_markdown(info, impl, reused, self.session.load_seconds, is_default)
        return status, views.describe_markdown(info), kv_cache_figure(engine.kv_cache_view())

    def startup(
        self,
        choice,
        impl,
        quant,
        dtype,
        device,
        kv_mb,
        block_size,
        max_batch,
        max_len,
        trust_remote_code=False,
        progress=gr.Progress(),
    ):
        """Page load: fill the picker and make sure some engine is there (the default model when none is)."""
        note, dropdown = self.refresh_picker()
        try:
            spec = self.spec(
                choice, impl, quant, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code
            )
            # never replaces an engine someone is using
            engine, already = self.session.load_if_empty(spec, progress=progress_adapter(progress))
            if already:
                status, desc, kv = self._current_views(engine)
            else:
                status, desc, kv = self._loaded_views(engine, False, impl, quant, defaults.is_default(choice))
        except Exception as e:  # the page must open even when the default cannot load
            status, desc, kv = f"**Could not load** {choice}: {e}. Pick another model and press Load.", "", gr.skip()
        return note, dropdown, status, desc, kv

    def _current_views(self, engine):
        info = describe(engine)
        spec = self.session.spec
        is_default = str(engine.config.model) == str(defaults.default_model_path(self.cache_root))
        status = views.load_status_markdown(
            info,
            spec.model_impl if spec else "auto",
            True,
            self.session.load_seconds,
            is_default,
            how="already loaded (one engine, shared by this app's users)",
        )
        return status, views.describe_markdown(info), kv_cache_figure(engine.kv_cache_view())

    def _engine(self):
        engine = self.session.current(wait=LOAD_WAIT_S)  # a load in progress (e.g. at page load) finishes first
        if engine is None:
            raise gr.Error("No model is loaded: pick one in the Model panel and press Load.", title="No model")
        return engine

    # --- generate -------------------------------------------------------------------------------

    def _params(self, n: int, temperature, top_p, top_k, max_new, seed, ignore_eos):
        from backend import SamplingParams

        base = None if seed is None or seed < 0 else int(seed)
        return [
            SamplingParams(
                max_new_tokens=int(max_new),
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                ignore_eos=bool(ignore_eos),
                seed=None if base is None else base + i,
            )  # copies differ when sampling
            for i in range(n)
        ]

    def _prompts(self, prompt: str, mode: str, copies) -> list[str]:
        prompts = split_prompts(prompt, mode, int(copies or 1))
        if not prompts:
            raise gr.Error("Type a prompt first (one per line in 'one prompt per line' mode).", title="No prompt")
        return prompts

    @user_errors("generating")
    def generate(
        self,
        prompt,
        use_chat_template,
        mode,
        copies,
        temperature,
        top_p,
        top_k,
        max_new,
        seed,
        ignore_eos,
        request: gr.Request = None,
    ):
        """Yields (first output, outputs table, run status, throughput, TTFT, batch, memory, summary, KV view)."""
        engine = self._engine()
        prompts = self._prompts(prompt, mode, copies)
        if use_chat_template and not getattr(engine.tokenizer, "chat_template", None):
            gr.Warning("This tokenizer has no chat template: the prompt is sent as it is.")
        params = self._params(len(prompts), temperature, top_p, top_k, max_new, seed, ignore_eos)
        key = session_key(request)
        handle = self.runs.start(key)
        wl = Workload(engine, prompts, params, bool(use_chat_template), handle.cancel).start()
        handle.stoppers.append(wl.stop)
        try:
            last_kv = 0.0
            while True:
                finished = wl.wait(self.update_s)
                results, series = wl.snapshot()
                now = time.perf_counter()
                kv = gr.skip()
                if finished or now - last_kv > 1.0:
                    kv, last_kv = kv_cache_figure(engine.kv_cache_view()), now
                yield self._generate_views(engine, results, series, finished, handle.cancel.is_set(), wl.wall_s, kv)
                if finished:
                    return
        finally:
            if not wl.done:  # the browser went away or the event was cancelled
                wl.stop()
            self.runs.finish(key, handle)

    def _generate_views(self, engine, results, series: Series, finished: bool, stopped: bool, wall_s: float, kv):
        kv_used = kv_total = None
        if finished:
            stats = engine.stats()
            kv_used, kv_total = stats.kv_blocks_used, stats.kv_blocks_total
        status = views.run_status_markdown(results, len(series), finished, stopped, kv_used, kv_total)
        runs = {"run": thin(series)}
        table = summary_table({"value": summarize(results, series, wall_s)})
        return (
            results[0].text if results else "",
            views.result_rows(results),
            status,
            throughput_figure(runs),
            ttft_figure({"run": [r.ttft for r in results]}),
            batch_figure(runs),
            memory_figure(runs),
            table,
            kv,
        )

    def stop(self, request: gr.Request = None) -> str:
        n = self.runs.stop(session_key(request))
        return "**stopping**: requests aborted, their KV blocks are freed." if n else "Nothing is running."

    # --- compare --------------------------------------------------------------------------------

    @user_errors("comparing")
    def compare(
        self,
        choice,
        a_impl,
        a_quant,
        b_impl,
        b_quant,
        dtype,
        device,
        kv_mb,
        block_size,
        max_batch,
        max_len,
        prompt,
        use_chat_template,
        mode,
        copies,
        max_new,
        ignore_eos,
        trust_remote_code=False,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Run the same greedy workload with settings A then B (one engine at a time); overlay the curves.

        Yields (status, throughput, TTFT, memory, batch, summary table, agreement table, load status)."""
        from backend import SamplingParams

        prompts = self._prompts(prompt, mode, copies)
        params = SamplingParams(max_new_tokens=int(max_new), temperature=0.0, ignore_eos=bool(ignore_eos))
        sides_to_run = compare.settings(a_impl, a_quant, b_impl, b_quant)
        key = session_key(request)
        self._refuse_if_others_run(key, "Comparing")
        handle = self.runs.start(key)
        sides: dict[str, compare.Side] = {}
        decode = None
        skip = gr.skip()
        try:
            for name, impl, quant in sides_to_run:
                if handle.cancel.is_set():
                    break
                yield (f"**Loading** {name}: {impl} / {quant}…",) + (skip,) * 7
                spec = self.spec(
                    choice, impl, quant, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code
                )
                engine, reused = self.session.load(spec, progress=progress_adapter(progress))
                label = compare.label(name, engine.model_impl, impl, quant)
                load_status = self._loaded_views(engine, reused, impl, quant, defaults.is_default(choice))[0]
                decode = engine.tokenizer.decode
                wl = Workload(engine, prompts, [params] * len(prompts), bool(use_chat_template), handle.cancel).start()
                handle.stoppers.append(wl.stop)
                try:
                    while True:
                        finished = wl.wait(self.update_s)
                        results, series = wl.snapshot()
                        sides[name] = compare.Side(label, results, series, wl.wall_s)
                        status = f"**Running** {label}: {sum(r.num_tokens for r in results)} tokens"
                        yield (status,) + compare.figures(sides) + (skip, skip, load_status)
                        if finished:
                            break
                finally:
                    if not wl.done:
                        wl.stop()
                    handle.stoppers.remove(wl.stop)
            table, agree = compare.tables(sides, decode)
            yield (
                (compare.verdict(sides, agree, handle.cancel.is_set()),) + compare.figures(sides) + (table, agree, skip)
            )
        finally:
            self.runs.finish(key, handle)

    # --- benchmark ------------------------------------------------------------------------------

    @user_errors("benchmarking")
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
        """backend/tools/bench.py from the app (ui/benchmark.py). The lab's engine is closed first: every system
        loads the model itself. Yields (status, bar figure, results table, JSON file, load status)."""
        from backend.tools.bench import BenchOptions, prepare

        n, reps = benchmark.validate(workloads, systems, num_requests, repeat)
        key = session_key(request)
        self._refuse_if_others_run(key, "The benchmark")
        handle = self.runs.start(key)
        try:
            name = defaults.resolve_choice(choice, self.cache_root)
            path = str(hub_module().resolve_model(name, progress=progress_adapter(progress)))
            self.session.close()
            closed = "No engine loaded: the benchmark closed it to free memory. Press Load to load one again."
            opts = BenchOptions(
                dtype=dtype or "auto",
                device=device or "auto",
                quantization=quantization_value(quant),
                max_model_len=max_len_value(max_len),
                num_requests=n,
                repeat=reps,
                trust_remote_code=bool(trust_remote_code),
            )
            yield "**Preparing**: seeded workloads, memory bandwidth…", gr.skip(), gr.skip(), gr.skip(), closed
            setup = prepare(path, list(workloads), opts, label=name)
            note = (
                f"Quantization {opts.quantization} applies to our engine only; the HF baselines run the "
                "checkpoint as it is."
                if opts.quantization
                else ""
            )
            for update in benchmark.run(setup, list(systems), opts, handle.cancel, max(self.update_s, 1.0), note):
                yield update + (gr.skip(),)
        finally:
            self.runs.finish(key, handle)

    # --- inside the engine ----------------------------------------------------------------------

    def inspect(self):
        """-> (engine description markdown, KV block figure)."""
        engine = self.session.current()
        if engine is None:
            return views.describe_markdown(None), kv_cache_figure([])
        return views.describe_markdown(describe(engine)), kv_cache_figure(engine.kv_cache_view())

    def kv_view(self):
        engine = self.session.current()
        return kv_cache_figure(engine.kv_cache_view() if engine is not None else [])
