"""Start-up and page load: the host's model loaded when the app starts (a thread, `start_preload`), not on the first
page view, so the API serves at once; a page opened meanwhile shows one progress line in its main area
(converting the GGUF, waiting for another process that converts it, loading, with a percentage where one is known)
and its panel says what it waits for; then it fills the picker and shows the loaded engine's settings."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import gradio as gr

from ui.common import LOAD_WAIT_S, progress_adapter
from ui.errors import to_gr_error
from ui.lab.loading import Loader, checked_panel
from ui.lab.picker import ModelPicker
from ui.lab.state import LabState
from ui.panel import Panel, panel_values

logger = logging.getLogger(__name__)
WAIT_TICK_S = 0.5  # how often a page opened during the start-up load refreshes its progress


@dataclass
class StartupLoad:
    """The host's model loading at start-up: what it is doing now (gr.Progress's call signature, so the loading's
    progress adapter reports into it), for the pages that open meanwhile."""

    model: str = ""
    desc: str = "resolving the model…"
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

    def status(self) -> str:
        """The one progress line a page shows in its main area while this load runs."""
        return f"⏳ **Starting** {self.model}: {self.desc}" + (f" **{self.fraction:.0%}**" if self.fraction else "")

    def panel_note(self) -> str:
        """What the Model panel says it waits for meanwhile."""
        return (
            f"_Waiting for the host's model ({self.model}) to load, see the line above the tabs; this panel then "
            "shows the loaded engine's settings._"
        )


class PageStartup:
    """What demo.load calls when a page opens."""

    def __init__(self, state: LabState, picker: ModelPicker, loader: Loader) -> None:
        self.state = state
        self.picker = picker
        self.loader = loader

    def start_preload(self) -> StartupLoad:
        """Load the host's model with the host's settings in a thread (app.py calls this at start-up, a page that
        finds no engine too); its first load sets the host's settings (LabState.host_spec)."""
        load = StartupLoad(model=self.state.host_model or self.state.host_panel().choice)
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

    def follow_preload(self, outputs: int) -> Iterator[tuple]:
        """While the start-up load runs: its progress line in the load status (the main area), what the panel waits
        for in the picker's note, every other of the `outputs` left as it is."""
        load = self.state.startup_load
        shown = None
        while load is not None and not load.done.wait(0 if shown is None else WAIT_TICK_S):
            line = load.status()
            if line != shown:
                shown = line
                yield (load.panel_note(), gr.skip(), line) + (gr.skip(),) * (outputs - 3)

    def startup(self, choice, **options):
        """Fill the picker and make sure some engine is there (the host's model when none is: loaded by the start-up
        load, which this page follows with one progress line in the main area).

        Yields (picker note, model dropdown, load status, description, KV figure, then the panel's other values,
        then the search box and button): the panel shows the loaded engine's settings, also after a page reload
        while another model is loaded. `options`: the panel's engine options by name (ui/panel.py)."""
        state = self.state
        panel = Panel.of(choice)  # the page's values pass the same checks as at every door, below
        outputs = 5 + len(panel.values()) - 1 + 2
        try:
            # what loads when nothing is: the host's model with the host's settings, not the page's values (a
            # visitor calling /startup cannot set them)
            panel = Panel.of(choice, **options)
            checked_panel(state, panel)
            refused = None
        except Exception as e:
            refused = e
        running = state.startup_load is not None and not state.startup_load.done.is_set()
        if refused is None and not running and state.session.current(wait=0.0) is None:
            self.start_preload()
            running = True
        yield from self.follow_preload(outputs)
        note, dropdown = self.picker.refresh_picker()
        try:
            if refused is not None:
                raise refused
            engine = state.session.current(wait=LOAD_WAIT_S)  # a Load in progress finishes first
            if engine is None:
                load = state.startup_load
                raise gr.Error(load.error if load is not None and load.error else "no model is loaded")
            if running:  # this page waited for the load: say how long it took
                host = state.host_panel()
                status, desc, kv = self.loader.loaded_views(engine, False, host["model_impl"], host["quantization"])
            else:
                status, desc, kv = self.loader.engine_views(engine)
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
        yield (
            (note, gr.Dropdown(choices=choices, value=panel.choice), status, desc, kv)
            + panel.values()[1:]
            + (search, gr.Button(interactive=not offline))
        )
