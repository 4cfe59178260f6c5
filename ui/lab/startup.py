"""Page load: fill the picker, make sure some engine is there, and show the loaded engine's settings."""

from __future__ import annotations

import gradio as gr

from ui.common import Panel, panel_values, progress_adapter
from ui.errors import to_gr_error
from ui.lab.loading import Loader
from ui.lab.picker import ModelPicker
from ui.lab.state import LabState


class PageStartup:
    """What demo.load calls when a page opens."""

    def __init__(self, state: LabState, picker: ModelPicker, loader: Loader) -> None:
        self.state = state
        self.picker = picker
        self.loader = loader

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
        note, dropdown = self.picker.refresh_picker()
        panel = Panel(choice, impl, quant, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code,
                      step_tokens)  # fmt: skip
        try:
            spec = self.loader.spec(panel)
            # never replaces an engine someone is using
            engine, already = state.session.load_if_empty(spec, progress=progress_adapter(progress))
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
