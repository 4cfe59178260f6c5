"""Presets: one button each, filling the panels so that one engine mechanism becomes visible in seconds.

Budgets are given in KV blocks and scaled by the loaded model's bytes per block, so a preset means the same
on any model. `PresetButtons.preset` (ui/lab/preset.py) returns the values and says what it changed; the layout
then loads, generates, and puts the changed settings (`Settings`) back and loads the engine of the panel again.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

SYSTEM = (
    "You are a patient teacher at a workshop on inference engines. You explain things in short plain sentences, "
    "you give one concrete example for every idea, and you never use jargon without saying what it means. "
    "Today's topic is how a language model serves many users at once on one machine. "
)
QUESTIONS = ["What is a KV cache?", "Why batch requests?", "What is a token?", "What is prefill?"]
LONG_TEXT = " ".join(
    f"Paragraph {i}: a paged KV cache splits the keys and values of every sequence into fixed-size blocks, "
    "so memory is allocated as the sequence grows and freed the moment it finishes."
    for i in range(1, 5)
)


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    explain: str  # what to look at, shown when the preset runs
    prompt: str
    mode: str  # "copies" | "lines"
    copies: int
    max_new: int
    gap_s: float = 0.0  # seconds between request arrivals
    kv_blocks: int | None = None  # None: the panel's KV budget is left as it is (0 = auto)
    step_tokens: int = 2048  # tokens per step (max_num_batched_tokens)
    max_batch: int = 16


PRESETS = [
    Preset(
        "prefix",
        "Shared system prompt",
        "Every request starts with the same long system prompt. Later arrivals find its blocks already "
        "computed: the run status counts the **prefix-cache hits**, and in the KV map (Inside the engine) the "
        "shared blocks are yellow (ref_count > 1) while the requests run, green (cached) after.",
        "\n".join(SYSTEM + q for q in QUESTIONS),
        "lines",
        1,
        48,
        gap_s=0.4,
    ),
    Preset(
        "stagger",
        "Staggered arrivals",
        "Eight requests arrive 0.25 s apart and each stops after 48 tokens. **Continuous batching**: the batch "
        "plot climbs as requests join and falls as they finish, with no step waiting for a full batch.",
        "Tell me a short story about a robot who learns to paint.",
        "copies",
        8,
        48,
        gap_s=0.25,
    ),
    Preset(
        "preempt",
        "KV budget below need",
        "The KV cache holds 24 blocks, but six requests of ~120 tokens need about 48. When a running request "
        "needs a block and none is free, the newest one is **preempted**: its blocks are freed and it is "
        "recomputed later. The run status counts the preemptions; the waiting curve in the batch plot rises.",
        "Explain in detail how a paged KV cache works.",
        "copies",
        6,
        96,
        kv_blocks=24,
    ),
    Preset(
        "chunked",
        "Long prompt, small token budget",
        "A ~400-token prompt under a budget of 48 tokens per step: the prompt is **prefilled in chunks** of 48 "
        "over many steps (prefill tok/s in the throughput plot, 'prefill chunks' in the run status) while "
        "the other request keeps decoding in the same steps.",
        LONG_TEXT + "\nSummarize the idea of a paged KV cache in one sentence.",
        "lines",
        1,
        32,
        step_tokens=48,
    ),
]
BY_KEY = {p.key: p for p in PRESETS}


def kv_mb_for(preset: Preset, bytes_per_block: int | None, current_mb: float) -> float:
    """The KV budget (MB) for `preset.kv_blocks` blocks of the loaded model; the current one when none is set."""
    if preset.kv_blocks is None or not bytes_per_block:
        return current_mb
    return round(preset.kv_blocks * bytes_per_block / 2**20 * 1.001, 4)  # a hair over: rounding never drops one


@dataclass(frozen=True)
class Settings:
    """The panel settings a preset changes for its run and puts back afterwards (in the layout's order); the
    first four are engine options (changing them loads a new engine)."""

    kv_mb: float
    max_batch: int
    step_tokens: int
    max_len: int
    max_new: int
    temperature: float
    ignore_eos: bool
    gap_s: float
    chat: bool

    def values(self) -> tuple:
        return astuple(self)


LABELS = {
    "kv_mb": "KV budget (MB)",
    "max_batch": "max batch",
    "step_tokens": "token budget per step",
    "max_len": "max context",
    "max_new": "max new tokens",
    "temperature": "temperature",
    "ignore_eos": "ignore EOS",
    "gap_s": "arrival gap (s)",
    "chat": "chat template",
}
ENGINE_FIELDS = ("kv_mb", "max_batch", "step_tokens", "max_len")


def settings_for(preset: Preset, kv_mb: float) -> Settings:
    """The settings `preset` runs with (`kv_mb`: its KV budget for the loaded model, kv_mb_for)."""
    return Settings(
        kv_mb=kv_mb,
        max_batch=preset.max_batch,
        step_tokens=preset.step_tokens,
        max_len=0,
        max_new=preset.max_new,
        temperature=0.0,
        ignore_eos=True,
        gap_s=preset.gap_s,
        chat=True,
    )


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def changes(before: Settings, after: Settings) -> list[str]:
    """["token budget per step 2048 → 48", ...]: each setting the preset changes, in the panel's words."""
    out = []
    for f in fields(Settings):
        old, new = getattr(before, f.name), getattr(after, f.name)
        same = old == new if not isinstance(new, float) else abs(float(old or 0) - new) < 1e-9
        if not same:
            out.append(f"{LABELS[f.name]} {_show(old)} → {_show(new)}")
    return out


def changes_markdown(before: Settings, after: Settings) -> str:
    changed = changes(before, after)
    if not changed:
        return "_This preset changes no setting of the panel._"
    return "_Changed for this run, put back after it: " + "; ".join(changed) + "._"


@dataclass(frozen=True)
class PresetRun:
    """What the page keeps while a preset runs (a gr.State): the panel's settings before it, and what it changed."""

    label: str
    before: Settings
    changed: tuple[str, ...]

    def restored_markdown(self) -> str:
        """The line added to the run status once the panel's settings are back."""
        if not self.changed:
            return f"_Preset {self.label}: no setting of the panel was changed._"
        return (
            f"_Preset {self.label} ran with: {'; '.join(self.changed)}. The panel's own settings are back "
            "(the engine is loaded with them again)._"
        )
