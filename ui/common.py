"""What the callbacks share: the choices offered in the panels and small helpers (no engine state)."""

from __future__ import annotations

import gradio as gr

from backend.core.config import DTYPES, MODEL_IMPLS
from backend.loading.gguf import ConversionProgress
from backend.quantization import QUANTIZATION_METHODS
from backend.quantization.int4 import GROUP_SIZES as INT4_GROUP_SIZES
from backend.quantization.int4 import Int4Config
from ui import views
from ui.plots import Series

IMPL_CHOICES = list(MODEL_IMPLS)
DTYPE_CHOICES = ["auto", *DTYPES]


def _quant_choices() -> list[str]:
    """'as in checkpoint', 'none', then the on-the-fly methods ('int4' at its default group, then the other
    int4 group sizes by name, then llama.cpp Q4 files' mix: group 32 with the lm_head in int8); checkpoint formats
    (gptq, awq...) load 'as in checkpoint'."""
    choices = ["as in checkpoint", "none"]
    for name, method in QUANTIZATION_METHODS.items():
        if method.on_the_fly:
            choices.append(name)
            if name == "int4":
                choices += [f"int4:g{g}" for g in INT4_GROUP_SIZES if g != Int4Config.group_size]
                choices.append("int4:g32,lm_head=int8")
    return choices


QUANT_CHOICES = _quant_choices()
BLOCK_SIZES = [8, 16, 32, 64, 128]
MODE_CHOICES = [("copies of the prompt", "copies"), ("one prompt per line", "lines")]
SUMMARY_HEADERS = ["metric", "value"]
AGREEMENT_HEADERS = ["request", "prompt", "greedy outputs", "first difference"]
LOAD_WAIT_S = 600.0  # Generate waits this long for a model that is still loading


def quantization_value(label: str | None) -> str | None:
    """UI label -> Engine(quantization=...). 'as in checkpoint' and 'none' are both None: the engine loads a
    full-precision checkpoint unquantized and a pre-quantized checkpoint as it is (it cannot dequantize)."""
    return None if label in (None, "", "as in checkpoint", "none") else label


def device_choices() -> list[str]:
    import torch

    return ["auto", "cpu"] + (
        ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())][1:] if torch.cuda.is_available() else []
    )


def session_key(request: gr.Request | None) -> str:
    """The browser session (one page): whose runs Stop cancels, who holds a model slot."""
    return getattr(request, "session_hash", None) or "local"


def visitor_key(request: gr.Request | None, hosted: bool) -> str:
    """Who a visitor is, for the per-visitor caps (parallel sequences) and the engine's fair share (its owner).
    Hosted: the client address (through the host's trusted proxies: the server's ForwardedClientMiddleware with
    --api, uvicorn's proxy headers with FORWARDED_ALLOW_IPS otherwise, see app.py), the same id the API gives a
    client at that address, so that a client opening many sessions is still one visitor. Not hosted (this
    machine's user only): the browser session."""
    if hosted:
        host = getattr(getattr(request, "client", None), "host", None)
        if host:
            return f"client:{host}"
    return session_key(request)


def hub_module():
    from backend.loading import hub

    return hub


BUILD_STAGES = {  # backend.loading.gguf.ConversionProgress stages, for people
    "wait": "first use: waiting for another process to finish converting the model (it holds the cache's lock)…",
    "read": "first use: checking the GGUF file…",
    "tokenizer": "first use: converting the GGUF tokenizer (the slow part, ~20-60 s)…",
    "dequantize": "first use: dequantizing the GGUF weights…",
    "write": "first use: writing the safetensors checkpoint into the cache…",
    "build": "first use: building the built-in model into the cache…",
    "done": "built; loading it…",
}


def progress_adapter(progress):
    """hub DownloadProgress(stage, bytes_done, bytes_total, file) -> gr.Progress (bytes, then weight loading);
    a built-in model's ConversionProgress (first use) -> its stage."""

    def callback(p) -> None:
        if isinstance(p, ConversionProgress):  # a built-in model built / converted on first use
            progress(p.fraction if p.total else (0, None), desc=BUILD_STAGES.get(p.stage, p.stage))
            return
        stage = str(getattr(p, "stage", "") or "download")
        done, total = getattr(p, "bytes_done", 0) or 0, getattr(p, "bytes_total", 0) or 0
        files = f" ({p.files_done}/{p.files_total} files)" if getattr(p, "files_total", 0) else ""
        name = f" {p.file}" if getattr(p, "file", None) else ""
        if stage == "done":
            progress((0, None), desc="loading weights into the model (streaming safetensors)…")
        elif total:
            progress(
                min(1.0, done / total),
                desc=f"downloading{name} {views.fmt_bytes(done)} / {views.fmt_bytes(total)}{files}",
            )
        else:
            progress((0, None), desc=f"downloading{name}{files}…")

    return callback


def describe(engine) -> dict:
    try:
        return engine.describe()
    except Exception as e:  # the view must not fail a load: say what went wrong instead
        return dict(model=engine.config.model, implementation=engine.model_impl, describe_error=str(e))


def thin(series: Series, max_points: int = 1500) -> Series:
    """Keep every k-th step so long runs stay light to send to the browser."""
    n = len(series)
    if n <= max_points:
        return series
    k = -(-n // max_points)
    return Series(**{name: values[::k] for name, values in vars(series).items()})


def validate_spec(spec) -> None:
    """Refuse settings that cannot load before the loaded engine is closed: engine options, a GGUF file, a local
    folder that is missing or holds no checkpoint (raises EngineError subclasses, as the engine would)."""
    from backend.core.config import EngineConfig
    from backend.loading import hub_common

    EngineConfig.from_kwargs(spec.model, **spec.engine_kwargs())
    if hub_common.is_gguf_name(spec.model):
        from backend.core.errors import UnsupportedModelError

        raise UnsupportedModelError(f"{spec.model}: {hub_common.GGUF_MESSAGE}")
    folder = hub_common.local_path(spec.model)
    if folder is not None:
        hub_common.check_local_folder(folder)
