"""Text views: pure builders of the markdown and table rows the UI shows (no Gradio, no engine)."""

from __future__ import annotations

from pathlib import Path

from ui.fmt import fmt_bytes, fmt_count  # noqa: F401  (re-exported)
from ui.summary import RequestResult
from ui.tables import column_widths

# Keys shown first (in this order) when present; the rest follow as they come.
_DESCRIBE_ORDER = (
    "model",
    "implementation",
    "requested_impl",
    "model_class",
    "architecture",
    "attention",
    "attention_backend",
    "attention_modules",
    "injected",
    "swapped",
    "parameters",
    "layers",
    "heads",
    "kv_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "dtype",
    "device",
    "quantization",
    "quantized_linears",
    "weights_bytes",
)
_FLATTEN = ("kv_cache",)
_HIDDEN = (
    "module_tree",
)  # shown by the module tree view (ui/inside.py), not as a table row  # nested dicts shown as one row per entry


def _inline(value) -> str:
    if isinstance(value, dict):
        if not value:
            return "none"
        return "; ".join(f"{k}: {_inline(v)}" for k, v in value.items())
    return str(value)


def _cell(key: str, value) -> str:
    if isinstance(value, (list, tuple, set)):
        items = [str(v) for v in value]
        shown = ", ".join(f"`{v}`" for v in items[:6])
        text = f"{len(items)}: {shown}" + (" …" if len(items) > 6 else "") if items else "none"
    elif isinstance(value, dict):
        text = _inline(value)
    elif isinstance(value, int) and not isinstance(value, bool) and "bytes" in key:
        text = fmt_bytes(value)
    elif isinstance(value, int) and not isinstance(value, bool) and key in ("parameters", "params"):
        text = f"{value:,} ({fmt_count(value)})"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
    else:
        text = "—" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def describe_markdown(info: dict | None, name: str | None = None) -> str:
    """engine.describe() as a two-column markdown table (kv_cache entries flattened as `kv_cache.x`); the model
    row shows `name` (or a readable form of the model path), the full path has its own row."""
    if not info:
        return "_No engine loaded._"
    info = {k: v for k, v in info.items() if k not in _HIDDEN}
    info["model"] = name or model_name(info.get("model"))
    flat: dict[str, object] = {}
    for key, value in info.items():
        if key in _FLATTEN and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    keys = [k for k in _DESCRIBE_ORDER if k in flat] + [k for k in flat if k not in _DESCRIBE_ORDER]
    return "\n".join(["| property | value |", "|---|---|"] + [f"| **{k}** | {_cell(k, flat[k])} |" for k in keys])


def model_name(model: str | None) -> str:
    """A model's name for people: a Hub id stays; a Hub cache path (models--org--name/snapshots/…) becomes
    org/name; any other folder shows its last two parts."""
    text = str(model or "?")
    parts = Path(text).parts
    for part in parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    if len(parts) > 2 and Path(text).is_absolute():
        return "…/" + "/".join(parts[-2:])
    return text


def weights_text(info: dict) -> str:
    """Weights, with the RoPE tables split out: they are why one checkpoint's size differs per implementation."""
    total, rope = info.get("weights_bytes"), info.get("rope_table_bytes") or 0
    if not isinstance(total, int) or rope <= 0 or rope * 100 < total:  # under 1 %: not worth a note
        return f"weights {fmt_bytes(total)}"
    return (
        f"weights {fmt_bytes(total - rope)} + RoPE table {fmt_bytes(rope)} (precomputed cos/sin for every "
        "position; the transformers implementation computes them per step, so its total is smaller)"
    )


def context_text(info: dict, kv: dict) -> str:
    """Max context, and why when the KV budget cut it below the model's own."""
    ctx, own = kv.get("max_model_len"), info.get("model_context_len")
    text = f"max context **{ctx if ctx is not None else '?'}** tokens"
    if isinstance(ctx, int) and isinstance(own, int) and ctx < own:
        text += (
            f" — **cut from the model's {own:,} by the KV cache budget** (one sequence must fit in the cache): "
            "raise the KV budget (0 = auto) for longer prompts and outputs"
        )
    return text


def load_status_markdown(
    info: dict,
    impl_choice: str,
    reused: bool,
    load_seconds: float,
    is_default: bool,
    how: str | None = None,
    default_label: str | None = None,
) -> str:
    impl = info.get("implementation") or info.get("impl") or "?"
    why = "a native implementation exists" if impl == "native" else "no native implementation for this architecture"
    resolved = f"**{impl}**" + (f" (auto resolved to {impl}: {why})" if impl_choice == "auto" else "")
    quant = info.get("quantization") or "none (as in checkpoint)"
    kv = info.get("kv_cache") or {}
    how = how or ("reused the loaded engine (nothing changed)" if reused else f"loaded in {load_seconds:.2f} s")
    name = (default_label or "the built-in default model") if is_default else model_name(info.get("model"))
    lines = [
        f"**{name}** — {how}",
        f"implementation: {resolved} · quantization: **{quant}** · dtype: **{info.get('dtype', '?')}** · "
        f"device: **{info.get('device', '?')}**",
        f"{weights_text(info)} · KV cache {fmt_bytes(kv.get('bytes'))} = "
        f"{kv.get('num_blocks', '?')} blocks × {kv.get('block_size', '?')} tokens · {context_text(info, kv)}",
    ]
    if is_default and "random weights" in (default_label or ""):
        lines.insert(
            0,
            "**random weights — for trying the app offline**: the text is gibberish by design; "
            "the engine, batching and plots are real.",
        )
    return "\n\n".join(lines)


def estimate_markdown(est, kv_budget_mb: float | None, fmt=fmt_bytes) -> str:
    """hub.MemoryEstimate as a short paragraph, next to the KV budget the engine will allocate."""
    seqs, ctx = getattr(est, "num_seqs", 0), getattr(est, "context_len", 0)
    kv_for = f"KV for {seqs} × {ctx} tokens" if seqs and ctx else "KV cache"
    quant = f", {est.quantization}" if getattr(est, "quantization", None) else ""
    text = (
        f"**Memory estimate** ({est.dtype}{quant}): params {fmt_count(est.params)} · weights "
        f"{fmt(est.weight_bytes)} · {kv_for} {fmt(est.kv_cache_bytes)} · total ≈ **{fmt(est.total_bytes)}**"
    )
    if kv_budget_mb:
        text += f" · KV cache budget set below: {fmt(kv_budget_mb * 2**20)}"
    notes = [est.notes] if isinstance(est.notes, str) else list(est.notes or [])
    return "\n\n".join([text] + [f"_{n}_" for n in notes if n])


SEARCH_HEADERS = ["model", "params", "size", "downloads", "likes", "gated", "library"]


def search_rows(models) -> list[list]:
    return [
        [
            m.id,
            fmt_count(m.params),
            fmt_bytes(m.size_bytes),
            f"{m.downloads or 0:,}",
            f"{m.likes or 0:,}",
            "yes" if m.gated else "",
            m.library or "",
        ]
        for m in models
    ]


RESULT_HEADERS = ["#", "status", "tokens", "TTFT (ms)", "prompt", "output"]
RESULT_WIDTHS = column_widths(RESULT_HEADERS, {"#": 2, "status": 7, "prompt": "20%", "output": "30%"})


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-n:]


def result_rows(results: list[RequestResult], max_chars: int = 240) -> list[list]:
    """One row per request; the output column shows the latest `max_chars` characters."""
    return [
        [
            r.index,
            r.error or r.status,
            r.num_tokens,
            "" if r.ttft is None else round(r.ttft * 1000, 1),
            r.prompt[:60],
            _tail(r.text, max_chars),
        ]
        for r in results
    ]


def run_status_markdown(
    results: list[RequestResult],
    steps: int,
    done: bool,
    stopped: bool,
    kv_used: int | None = None,
    kv_total: int | None = None,
    notes: list[str] | None = None,
    counters: str = "",
) -> str:
    tokens = sum(r.num_tokens for r in results)
    n = len(results)
    extra = (f"\n\n{counters}" if counters else "") + "".join(f"\n\n_{note}_" for note in notes or [])
    if not done:
        running = sum(r.status == "running" for r in results)
        return f"**running** {n} request(s): {running} running · {tokens} tokens · {steps} engine steps{extra}"
    head = "**stopped**" if stopped else "**done**"
    kv = f" · KV blocks in use now: {kv_used}/{kv_total}" if kv_used is not None else ""
    errors = [r.error for r in results if r.error]
    tail = f"\n\n**{len(errors)} failed**: {errors[0]}" if errors else ""
    return f"{head}: {n} request(s) · {tokens} tokens · {steps} engine steps{kv}{tail}{extra}"


def counters_markdown(before, after, series) -> str:
    """What the mechanisms did during a run (EngineStats before and now, the run's steps)."""
    queried = after.prefix_queried_blocks - before.prefix_queried_blocks
    hits = after.prefix_hit_blocks - before.prefix_hit_blocks
    preempted = after.num_preemptions - before.num_preemptions
    prefill_steps = sum(1 for n in series.prefill_tokens if n > 0)
    peak = max(series.batch_size, default=0)
    return (
        f"prefix cache: **{hits}/{queried}** prompt blocks found cached · preemptions: **{preempted}** · "
        f"prefill chunks (steps with prompt tokens): **{prefill_steps}** · peak batch: **{peak}**"
    )
