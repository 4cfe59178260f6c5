"""Loading: the panel's values -> a LoadSpec after the host's checks (model name, remote code, memory), the Load
button, loading the lab's engine again after Compare / Benchmark, and the status lines of a loaded engine."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from backend.hosting import (
    ModelSettings,
    RemoteCodeDecision,
    check_model_fits,
    check_remote_code,
    hosted_load_options,
)
from ui import defaults, views
from ui.common import (
    describe,
    progress_adapter,
    session_key,
    validate_spec,
)
from ui.errors import error_status, to_gr_error
from ui.lab.state import LabState
from ui.panel import Panel, check_panel_numbers
from ui.plots import kv_cache_figure
from ui.session import LoadSpec

SHARED = "already loaded (one engine, shared by this app's users)"


@dataclass(frozen=True)
class HostedModel:
    """A picker choice after the host's checks: the model name, whether local paths may load, remote code."""

    model: str
    allow_local_paths: bool
    remote_code: RemoteCodeDecision


def hosted_model(state: LabState, choice: str, trust_remote_code: bool) -> HostedModel:
    """The host's checks on a model name and on remote code (raises HostingError). The visitor's
    `trust_remote_code` is only asked for: the decision is the host's."""
    opts = hosted_load_options(defaults.resolve_choice(choice), state.policy)
    decision = check_remote_code(opts["model"], bool(trust_remote_code), state.policy)
    return HostedModel(opts["model"], bool(opts["allow_local_paths"]), decision)


def checked_panel(state: LabState, panel: Panel) -> HostedModel:
    """The one check every door runs on the Model panel's values before it touches the file system: the numbers
    against their ranges (EngineError), then the model name and remote code against the host's policy
    (HostingError: one message for every refused path)."""
    check_panel_numbers(panel)
    return hosted_model(state, panel.choice, panel["trust_remote_code"])


def describe_md(engine, info: dict) -> str:
    return views.describe_markdown(info, defaults.label_for(engine.config.model))


class Loader:
    """What the Load button calls, and the loading that Compare and Benchmark do."""

    def __init__(self, state: LabState) -> None:
        self.state = state

    def spec(self, panel: Panel) -> LoadSpec:
        """The panel's values -> what to load, after the host's checks on the name and on remote code (raises
        HostingError; a number outside its range: EngineError). `state.last_remote_code` says what was decided
        about remote code."""
        hosted = checked_panel(self.state, panel)
        self.state.last_remote_code = hosted.remote_code
        options = panel.engine_options() | dict(trust_remote_code=hosted.remote_code.trust)
        return LoadSpec.make(
            hosted.model,
            **options,
            allow_local_paths=None if hosted.allow_local_paths else False,
            **self.state.policy.engine_options(),
        )

    def check_fits(self, spec: LoadSpec) -> None:
        """The memory check (hosted or not; `--no-check-memory` turns it off), before anything downloads or is
        allocated: weights + the KV budget asked (else the KV cache of one visitor's parallel sequences at the
        panel's context, or the host's caps, else 4096 tokens) + the load peak, against the free memory."""
        opts = dict(spec.options)
        p = self.state.policy
        context = opts.get("max_model_len") or ((p.max_prompt_tokens or 0) + (p.max_new_tokens or 0)) or 4096
        settings = ModelSettings(
            dtype=spec.dtype,
            quantization=spec.quantization,
            context_len=int(context),
            num_seqs=min(int(opts.get("max_num_seqs", 1)), p.max_parallel_per_visitor or 1),
            device=spec.device,
            revision=opts.get("revision"),
            kv_cache_memory_gb=opts.get("kv_cache_memory_gb"),
            max_model_len=opts.get("max_model_len"),
            block_size=int(opts.get("block_size", 16)),
        )
        check_model_fits(spec.model, settings, p, allow_local_paths=opts.get("allow_local_paths", True) is not False)

    def check_new(self, spec: LoadSpec) -> None:
        """Settings that would replace the loaded engine: refused (memory, engine options, a missing folder)
        before the loaded engine is closed. Nothing to check when `spec` is what is loaded."""
        if self.state.session.spec != spec:
            validate_spec(spec)  # the options' ranges first: the memory check sizes what they ask
            self.check_fits(spec)

    def load(self, choice, request: gr.Request = None, progress=gr.Progress(), **options):
        """The Load button -> (status markdown, engine description markdown, KV block figure). `options`: the
        panel's engine options by name (ui/panel.py; Gradio's inputs_kwargs), the others at their first value.

        New settings are checked before the loaded engine is closed; when the new engine still fails to build,
        the previous one is loaded again and the status says so (the error is a warning toast, not a badge)."""
        state = self.state
        progress(0, desc="resolving the model…")
        try:
            panel = Panel.of(choice, **options)
            spec = self.spec(panel)
            key = session_key(request)
            claimed = False
            if state.session.spec != spec:
                state.refuse_if_others_run(key, "Loading these settings")
                claimed = state.claim_model(key, spec)
            try:
                self.check_new(spec)
                engine, reused = state.session.load(spec, progress=progress_adapter(progress))
            except BaseException:
                if claimed:
                    state.model_slots.release(key)
                raise
            state.loaded_for(key, spec)
        except Exception as e:
            err = to_gr_error(e, "loading the model")
            gr.Warning(err.message, title=err.title or "Load failed")
            return self._failed_load_views(err)
        status, desc, kv = self.loaded_views(engine, reused, panel["model_impl"], panel["quantization"])
        decision = state.last_remote_code
        if decision is not None and (decision.needs or panel["trust_remote_code"]):
            status += f"\n\n_Remote code: {decision.message}._"
        return status, desc, kv

    def restore(self, previous: LoadSpec | None, what: str) -> str | None:
        """Load `previous` again after Compare / Benchmark replaced it: -> the load status, None when none was."""
        if previous is None:
            return None
        engine, reused = self.state.session.load(previous)
        how = "still loaded" if reused else f"loaded again after {what} ({self.state.session.load_seconds:.1f} s)"
        return self.engine_views(engine, how=how)[0]

    def restore_quietly(self, previous: LoadSpec | None, what: str) -> None:
        """restore() after an error or a closed page: still give the lab its engine back; a failure is logged
        (ui/errors.py), the run's own error or end is what the visitor sees."""
        try:
            self.restore(previous, what)
        except Exception as e:
            to_gr_error(e, f"loading the lab's engine again after {what}")

    # --- the status lines of a loaded engine --------------------------------------------------

    def engine_views(
        self, engine, how: str | None = SHARED, impl: str | None = None, reused: bool = True, info: dict | None = None
    ):
        """-> (load status markdown, description markdown, KV block figure) of `engine`. `impl`: the panel's
        implementation choice (default: the loaded spec's); `how`: how it got there (None: reused / loaded in);
        `info`: its describe(), when the caller has it."""
        info = info if info is not None else describe(engine)
        spec = self.state.session.spec
        label = defaults.label_for(engine.config.model)
        if impl is None:
            impl = spec.model_impl if spec else "auto"
        load_s = self.state.session.load_seconds
        status = views.load_status_markdown(info, impl, reused, load_s, label is not None, how=how, default_label=label)
        return status, describe_md(engine, info), kv_cache_figure(engine.kv_cache_view())

    def loaded_views(self, engine, reused: bool, impl: str, quant: str):
        """engine_views() after a load with the panel's `impl` and `quant`; says when the checkpoint is quantized
        although the panel asked for none."""
        info = describe(engine)
        if quant == "none" and info.get("quantization"):
            gr.Warning(
                f"This checkpoint is quantized ({info['quantization']}); it loads as it is "
                "(dequantizing to full precision is not supported)."
            )
        return self.engine_views(engine, how=None, impl=impl, reused=reused, info=info)

    def _failed_load_views(self, err: gr.Error):
        engine = self.state.session.current()
        head = f"**Load failed** — {error_status(err)}"
        if engine is None:
            return f"{head}\n\n**No engine is loaded.** Fix the settings and press Load.", "", gr.skip()
        again = " (it was loaded again)" if self.state.session.restored is not None else ""
        status, desc, kv = self.engine_views(engine, how=f"still loaded, unchanged{again}")
        return f"{head}\n\n{status}", desc, kv
