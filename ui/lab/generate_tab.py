"""The Generate tab: run the prompts on the lab's engine, or on an OpenAI-compatible endpoint (ui/endpoint.py),
streaming the outputs, the run status, the plots and the summary."""

from __future__ import annotations

import time

import gradio as gr

from backend.hosting import check_request
from ui import endpoint as remote
from ui import images, views
from ui.common import session_key, thin, visitor_key
from ui.errors import status_errors
from ui.lab import follow
from ui.lab.run_inputs import cap_notes, context_stops, prompts_from, sampling_params
from ui.lab.state import LabState
from ui.numbers import checked
from ui.plots import Series, batch_figure, kv_cache_figure, memory_figure, throughput_figure, ttft_figure
from ui.summary import summarize, summary_table
from ui.workload import Workload


def run_views(results, series: Series, status: str, summary: dict, kv, memory=None) -> tuple:
    """The Generate tab's nine outputs (first output, outputs table, run status, throughput, TTFT, batch, memory,
    summary, KV view) of a run so far. `kv`: a figure or gr.skip(); `memory`: a figure, None for our engine's
    memory figure from `series`."""
    runs = {"run": thin(series)}
    return (
        results[0].text if results else "",
        views.result_rows(results),
        status,
        throughput_figure(runs),
        ttft_figure({"run": [r.ttft for r in results]}),
        batch_figure(runs),
        memory_figure(runs) if memory is None else memory,
        summary_table({"value": summary}),
        kv,
    )


class KVPeak:
    """The KV block view at the busiest moment of a run (most blocks held), kept so that the KV map can show the
    last run's state after its blocks were freed, also when the live view is off."""

    def __init__(self) -> None:
        self.used = 0
        self.view: list | None = None

    def take(self, kv_cache_view) -> None:
        view = kv_cache_view()
        used = sum(1 for b in view if b.ref_count > 0)
        if used > self.used:
            self.used, self.view = used, view

    def figure(self, now: list):
        """The peak view (`now`, the view after the run, when no block was ever seen held)."""
        if self.view is None:
            return kv_cache_figure(now, note="after the last run")
        note = f"at the last run's peak: {self.used} blocks held (Refresh: now)"
        return kv_cache_figure(self.view, note=note)


class GenerateTab:
    """What the Generate button (and a preset, after its load) calls."""

    def __init__(self, state: LabState) -> None:
        self.state = state

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
        image=None,
        request: gr.Request = None,
    ):
        """Yields (first output, outputs table, run status, throughput, TTFT, batch, memory, summary, KV view).
        With `endpoint_url`, the target is that OpenAI-compatible endpoint instead of our engine (ui/endpoint.py).
        `image`: an uploaded image file every request carries (an image-text model; checked by ui/images.py)."""
        runs = checked(
            copies=copies, temperature=temperature, top_p=top_p, top_k=top_k, max_new=max_new, seed=seed, gap_s=gap_s
        )  # every number against its one range (ui/numbers.py), before anything runs
        copies, max_new = runs["copies"], runs["max_new"]
        image = images.checked_image(image)  # RequestError: too large, does not decode
        if (endpoint_url or "").strip():
            images.refuse_endpoint_image(image)
            yield from self._generate_endpoint(
                prompt, mode, copies, temperature, top_p, top_k, max_new, seed, ignore_eos, gap_s,
                endpoint_url, endpoint_key, request,
            )  # fmt: skip
            return
        engine = self.state.engine()
        prompts = prompts_from(prompt, mode, copies)
        check_request(self.state.policy, max_new_tokens=max_new)
        if use_chat_template and not getattr(engine.tokenizer, "chat_template", None):
            gr.Warning("This tokenizer has no chat template: the prompt is sent as it is.")
        params = sampling_params(len(prompts), temperature, top_p, top_k, max_new, seed, ignore_eos)
        visitor = visitor_key(request, self.state.policy.hosted)  # the engine's owner and the caps' key
        wl = Workload(
            engine, prompts, params, bool(use_chat_template), None, gap_s=float(gap_s or 0), owner=visitor, image=image
        )
        check_request(self.state.policy, prompt_tokens=max(wl.prompt_lens, default=0))
        with self.state.visitors.running(visitor, len(prompts)):  # HostingError over the visitor's parallel cap
            yield from self._run_generate(engine, wl, session_key(request), max_new)

    def _run_generate(self, engine, wl: Workload, key: str, max_new: int):
        with self.state.run(key) as handle:
            wl.cancel = handle.cancel
            before = engine.stats()
            notes = cap_notes(engine.max_model_len, wl.prompt_lens, max_new)
            for note in notes:
                gr.Warning(note, title="Capped by the context")
            last_kv = 0.0
            peak = KVPeak()
            with follow.started(wl, handle):
                for finished, results, series in follow.updates(wl, self.state.update_s):
                    now = time.perf_counter()
                    kv = gr.skip()
                    if not finished:
                        peak.take(engine.kv_cache_view)
                    if finished:  # the run's blocks are freed by now: show them as they were at its peak
                        kv = peak.figure(engine.kv_cache_view())
                    elif now - last_kv > 1.0:
                        kv, last_kv = kv_cache_figure(engine.kv_cache_view()), now
                    status = self._status(engine, results, series, finished, handle.cancel.is_set(), notes, before)
                    summary = summarize(results, series, wl.wall_s)
                    yield run_views(results, series, status, summary, kv)

    def _status(self, engine, results, series: Series, finished: bool, stopped: bool, notes, before) -> str:
        kv_used = kv_total = None
        stats = engine.stats()
        if finished:
            kv_used, kv_total = stats.kv_blocks_used, stats.kv_blocks_total
        counters = views.counters_markdown(before, stats, series)
        notes = list(notes) + context_stops(engine.max_model_len, results) if finished else list(notes)
        return views.run_status_markdown(results, len(series), finished, stopped, kv_used, kv_total, notes, counters)

    def _generate_endpoint(
        self, prompt, mode, copies, temperature, top_p, top_k, max_new, seed, ignore_eos, gap_s, url, api_key, request
    ):
        """Generate on an endpoint: the prompts go as text to its /v1/completions (no chat template: the endpoint's
        model may not be ours); the plots come from its stream timings, memory / KV from its /metrics."""
        state = self.state
        endpoint = remote.connect(url, api_key, state.policy)  # hosted: refused; no answer: EndpointError
        prompts = prompts_from(prompt, mode, copies)
        params = sampling_params(len(prompts), temperature, top_p, top_k, max_new, seed, ignore_eos)
        label = f"endpoint {endpoint.model} at {endpoint.api}"
        with state.run(session_key(request)) as handle:
            wl = remote.EndpointWorkload(endpoint, prompts, params, cancel=handle.cancel, gap_s=float(gap_s or 0))
            with follow.started(wl, handle):
                for finished, results, series in follow.updates(wl, state.update_s):
                    source, samples = wl.metrics_snapshot()
                    status = views.run_status_markdown(results, len(series), finished, handle.cancel.is_set())
                    status = status.replace("steps", "stream bursts") + f"  \n_{label} (prompts sent as text)_"
                    summary = remote.rename_steps(summarize(results, series, wl.wall_s))
                    summary["KV usage peak (/metrics)"] = remote.kv_peak(source, samples)
                    memory = remote.metrics_figure(source, samples, label)
                    yield run_views(results, series, status, summary, gr.skip(), memory=memory)
