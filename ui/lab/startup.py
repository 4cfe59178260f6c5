"""Start-up and page load: the host's model loaded when the app starts (a thread, `start_preload`), not on the first
page view, so the API serves at once; a page opened meanwhile shows the loading progress, then fills the picker and
shows the loaded engine's settings."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import gradio as gr

from ui.common import Panel, panel_values, progress_adapter
from ui.errors import to_gr_error
from ui.lab.loading import Loader, checked_panel
from ui.lab.picker import ModelPicker
from ui.lab.state import LabState

logger = logging.getLogger(__name__)
WAIT_TICK_S = 0.5  # how often a page opened during the start-up load refreshes its progress


@dataclass
class StartupLoad:
    """The host's model loading at start-up: what it is doing now (gr.Progress's call signature, so the loading's
    progress adapter reports into it), for the pages that open meanwhile."""

    desc: str = "starting…"
    fraction: float | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __call__(self, value, desc: str | None = None) -> None:
        if desc:
            self.desc = desc
        self.fraction = float(value) if isinstance(value, (int, float)) else None

    def line(self) -> str:
        pct = f" ({self.fraction:.0%})" if self.fraction else ""
        return f"loading the host's model at start-up: {self.desc}{pct}"


class PageStartup:
    """What demo.load calls when a page opens."""

    def __init__(self, state: LabState, picker: ModelPicker, loader: Loader) -> None:
        self.state = state
        self.picker = picker
        self.loader = loader

    def start_preload(self) -> StartupLoad:
        """Load the host's model with the host's settings in a thread (app.py calls this at start-up); its first
        load sets the host's settings (LabState.host_spec)."""
        load = StartupLoad()
        self.state.startup_load = load
        threading.Thread(target=self._preload, args=(load,), name="flab-preload", daemon=True).start()
        return load

    def _preload(self, load: StartupLoad) -> None:
        state = self.state
        try:
            spec = self.loader.spec(state.host_panel())
            self.loader.check_new(spec)
            state.session.load_if_empty(spec, progress=progress_adapter(load))
            if state.session.spec == spec:
                state.loaded_for("host", spec)
            load.desc = "loaded"
        except Exception as e:  # the app still opens: the page says why and the panel can load another model
            load.error = to_gr_error(e, "loading the host's model at start-up").message
        finally:
            load.done.set()

    def wait_for_preload(self, progress) -> None:
        """A page opened while the start-up load runs: its progress bar follows that load until it ends."""
        load = self.state.startup_load
        while load is not None and not load.done.wait(WAIT_TICK_S):
            progress(load.fraction if load.fraction else (0, None), desc=load.line())

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
        """Fill the picker and make sure some engine is there (the default model when none is).

        -> (picker note, model dropdown, load status, description, KV figure, then the panel's other values,
        then the search box and button): the panel shows the loaded engine's settings, also after a page reload
        while another model is loaded."""
        state = self.state
        self.wait_for_preload(progress)
        note, dropdown = self.picker.refresh_picker()
        panel = Panel(choice, impl, quant, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code,
                      step_tokens)  # fmt: skip
        try:
            # what loads when nothing is: the host's model with the host's settings, not the page's values (a
            # visitor calling /startup cannot set the shared engine's settings)
            checked_panel(state, panel)  # the page's values pass the same checks as at every door
            spec = self.loader.spec(state.host_panel())
            if state.session.current() is None:
                self.loader.check_new(spec)
            # never replaces an engine someone is using
            engine, already = state.session.load_if_empty(spec, progress=progress_adapter(progress))
            if not already:
                state.loaded_for("host", spec)
            if already:
                status, desc, kv = self.loader.engine_views(engine)
            else:
                status, desc, kv = self.loader.loaded_views(engine, False, impl, quant)
            if state.session.spec is not None:
                panel = panel_values(state.session.spec)
        except Exception as e:  # the page must open even when the default cannot load
            err = to_gr_error(e, "loading the default model")
            status, desc, kv = (
                f"**Could not load** {choice}: {err.message} Pick another model and press Load.",
                "",
                gr.skip(),
            )
            if state.session.spec is not None:  # the panel shows what is loaded, never the refused values
                panel = panel_values(state.session.spec)
        choices = dropdown.choices or []
        if panel.choice not in [c[1] if isinstance(c, (tuple, list)) else c for c in choices]:
            choices = list(choices) + [(f"{panel.choice}  (loaded)", panel.choice)]
        offline = state.offline()
        search = gr.Textbox(
            interactive=not offline,
            placeholder="offline (no Hub access): search is off" if offline else "search the Hub (e.g. qwen, smollm)",
        )
        return (
            (note, gr.Dropdown(choices=choices, value=panel.choice), status, desc, kv)
            + panel.values()[1:]
            + (search, gr.Button(interactive=not offline))
        )
