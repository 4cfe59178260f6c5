"""A preset button: the values it puts in the panels (ui/presets.py), sized for the loaded engine's KV blocks."""

from __future__ import annotations

from ui import defaults, presets
from ui.common import describe
from ui.errors import user_errors
from ui.lab.loading import hosted_model
from ui.lab.state import LabState


class PresetButtons:
    """What a preset button calls first (the layout then loads and generates)."""

    def __init__(self, state: LabState) -> None:
        self.state = state

    @user_errors("choosing a preset")
    def preset(self, key: str, choice):
        """-> the values a preset puts in the panels: (kv_mb, max_batch, step_tokens, max_len, prompt, mode,
        copies, max_new, temperature, ignore_eos, gap_s, chat, run status explaining what to watch)."""
        p = presets.BY_KEY[key]
        hosted_model(self.state, choice, False)  # the host's checks on the name, as at every door (HostingError)
        engine = self.state.session.current()
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
