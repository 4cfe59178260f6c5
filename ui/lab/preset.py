"""A preset button: the values it puts in the panels (ui/presets.py), sized for the loaded engine's KV blocks, what
it changed, and the panel's own settings put back after its run."""

from __future__ import annotations

import gradio as gr

from ui import defaults, presets
from ui.common import describe
from ui.errors import user_errors
from ui.lab.loading import Loader, hosted_model
from ui.lab.state import LabState


def panel_settings(kv_mb, max_batch, step_tokens, max_len, max_new, temperature, ignore_eos, gap_s, chat):
    """The panel's values (as Gradio hands them over) -> presets.Settings."""
    return presets.Settings(
        kv_mb=float(kv_mb or 0),
        max_batch=int(max_batch or 1),
        step_tokens=int(step_tokens or 0),
        max_len=int(max_len or 0),
        max_new=int(max_new or 1),
        temperature=float(temperature or 0),
        ignore_eos=bool(ignore_eos),
        gap_s=float(gap_s or 0),
        chat=bool(chat),
    )


class PresetButtons:
    """What a preset button calls: `preset` first, then (after the layout's load and generate) `restore` and
    `reload`, which put the panel's settings and its engine back."""

    def __init__(self, state: LabState, loader: Loader) -> None:
        self.state = state
        self.loader = loader

    @user_errors("choosing a preset")
    def preset(self, key: str, choice, *panel):
        """`panel`: the panel's current values in presets.Settings' order. -> the preset's Settings values, then
        (prompt, mode, copies, run status saying what to watch and what changed, the PresetRun to restore from)."""
        p = presets.BY_KEY[key]
        hosted_model(self.state, choice, False)  # the host's checks on the name, as at every door (HostingError)
        before = panel_settings(*panel) if panel else None
        engine = self.state.session.current()
        per_block = None
        if engine is not None:
            kv = describe(engine).get("kv_cache") or {}
            if kv.get("bytes") and kv.get("num_blocks"):
                per_block = kv["bytes"] // kv["num_blocks"]
        current_kv = before.kv_mb if before is not None else defaults.suggested_kv_mb(choice)
        after = presets.settings_for(p, presets.kv_mb_for(p, per_block, current_kv))
        status = f"**Preset: {p.label}** — {p.explain}"
        run = None
        if before is not None:
            status += "  \n" + presets.changes_markdown(before, after)
            run = presets.PresetRun(p.label, before, tuple(presets.changes(before, after)))
        return after.values() + (p.prompt, p.mode, p.copies, status, run)

    def restore(self, run: presets.PresetRun | None, status: str | None):
        """After a preset's run: the panel's previous settings, and the run status saying what the preset had
        changed and that the panel's own settings are back."""
        if run is None:
            return (gr.skip(),) * (len(presets.LABELS) + 2)
        return run.before.values() + ((status or "") + "  \n" + run.restored_markdown(), None)

    def reload(self, choice, request: gr.Request = None, progress=gr.Progress(), **options):
        """The Load button's work after `restore` -> (load status, description); the KV map keeps the run's view."""
        status, desc, _ = self.loader.load(choice, request=request, progress=progress, **options)
        return status, desc
