"""The "Inside the engine" tab's pure parts: the module tree with what the engine injected or swapped
highlighted, and the table of one traced step's attention calls (backend/models/trace.py)."""

from __future__ import annotations

import html

from ui.tables import column_widths

TRACE_HEADERS = ["layer", "module", "reached us through", "q", "k", "v", "scale", "kwargs", "step"]
# longest data word per column: "model.layers.0.self_attn.attn", "AttentionInterface['fallback_lab_paged']", ...
TRACE_WIDTHS = column_widths(
    TRACE_HEADERS,
    {"layer": 3, "module": 30, "reached us through": 40, "q": 12, "k": 12, "v": 12, "scale": 6, "kwargs": 24},
)
WARM_PROMPT = "Hello, my name is"  # the request already running when the traced step starts (it decodes)
WHY_TWO = (
    f"Why one prefill and one decode for one prompt: the trace first starts a short request (“{WARM_PROMPT}”) "
    "and lets it prefill, then traces the step in which it **decodes** its next token while your prompt is "
    "**prefilled**, so one step shows both kinds of work sharing a batch (continuous batching)."
)


def tree_html(rows: list[dict] | None) -> str:
    """describe()['module_tree'] -> an indented list; injected / swapped modules highlighted with their role."""
    if not rows:
        return "<p><em>No engine loaded.</em></p>"
    lines = []
    for r in rows:
        name = html.escape(r["name"].rsplit(".", 1)[-1] or "(model)")
        repeat = f' <span class="flab-repeat">× {r["repeat"]}</span>' if r.get("repeat", 1) > 1 else ""
        role = f' <span class="flab-role">← {html.escape(r["role"])}</span>' if r.get("role") else ""
        cls = "flab-node flab-hit" if r.get("role") else "flab-node"
        pad = 1.2 * r["depth"]
        lines.append(
            f'<div class="{cls}" style="padding-left:{pad:.1f}em">{name} '
            f"<code>{html.escape(r['cls'])}</code>{repeat}{role}</div>"
        )
    marked = sum(bool(r.get("role")) for r in rows)
    head = (
        f"<p><b>Module tree</b> — {marked} highlighted module(s) are where our code runs "
        "(a repeated layer is shown once, × its count).</p>"
    )
    return f'<div class="flab-tree">{head}{"".join(lines)}</div>'


def trace_rows(calls) -> list[list]:
    """AttentionCall list -> table rows (one per layer)."""
    return [
        [
            "" if c.layer is None else c.layer,
            c.module,
            c.entry,
            "×".join(map(str, c.q_shape)),
            "×".join(map(str, c.k_shape)),
            "×".join(map(str, c.v_shape)),
            "" if c.scale is None else round(c.scale, 4),
            ", ".join(f"{k}={v}" for k, v in c.kwargs.items()) or "—",
            f"{c.num_tokens} tokens: {c.num_prefill} prefill + {c.num_decode} decode seq(s)",
        ]
        for c in calls
    ]


def trace_summary(calls, impl: str) -> str:
    if not calls:
        return "_The traced step made no attention call._"
    c = calls[0]
    if impl == "transformers":
        layout = (
            "transformers' own attention modules computed q, k and v and called the function registered under "
            f"our name ({c.entry}); q/k/v arrive as (batch 1, heads, tokens, head dim): the whole mixed batch is "
            "one row, the step's metadata travels as a forward kwarg."
        )
    else:
        layout = "our native modules called PagedAttention directly; q/k/v are (tokens, heads, head dim)."
    return (
        f"**One step traced**: {len(calls)} attention call(s), one per layer. The step held {c.num_tokens} new "
        f"tokens from {c.num_seqs} sequence(s): **{c.num_prefill} prefill** (prompt tokens written into the KV "
        f"cache) and **{c.num_decode} decode** (one token each, attending over its cached blocks). {layout}"
        + ("  \n_" + WHY_TWO + "_" if c.num_decode and c.num_prefill else "")
    )


# --- an image request, inside (ui/images.py prefill_image_request) ---------------------------------------------

IMAGE_TOKEN_STYLE = "background:#f0abfc;border:1px solid #c026d3"  # the KV map's image colour (ui/plots.py)
TEXT_TOKEN_STYLE = "background:#f3f4f6;border:1px solid #d1d5db"
RUN_COLLAPSE = 4  # a run of more image placeholders than this is shown as one chip "× n"
MAX_CHIPS = 400


def _chip(text: str, style: str, title: str, count: int = 1) -> str:
    shown = html.escape(text).replace(" ", "␣").replace("\n", "↵") or "∅"
    shown += f" × {count}" if count > 1 else ""
    return (
        f'<span class="flab-tok" title="{html.escape(title)}" style="{style};border-radius:4px;padding:0 3px;'
        f'margin:1px;display:inline-block;font-family:ui-monospace,monospace;font-size:12px">{shown}</span>'
    )


def token_chips(tokens: list[str], image_mask: list[bool]) -> list[str]:
    """One chip per prompt token; image placeholders coloured, a long run of them as one chip with its count."""
    chips: list[str] = []
    i = 0
    while i < len(tokens) and len(chips) < MAX_CHIPS:
        if not image_mask[i]:
            chips.append(_chip(tokens[i], TEXT_TOKEN_STYLE, f"position {i}"))
            i += 1
            continue
        j = i
        while j < len(tokens) and image_mask[j]:
            j += 1
        if j - i > RUN_COLLAPSE:
            title = f"positions {i}–{j - 1}: image placeholders"
            chips.append(_chip(tokens[i], IMAGE_TOKEN_STYLE, title, count=j - i))
        else:
            chips.extend(_chip(tokens[k], IMAGE_TOKEN_STYLE, f"position {k}: image placeholder") for k in range(i, j))
        i = j
    if i < len(tokens):
        chips.append(f"<span> … {len(tokens) - i} more</span>")
    return chips


def token_view_html(tokens: list[str], image_mask: list[bool]) -> str:
    """The prompt tokens of an image request, image placeholders marked (pink, as their blocks in the KV map)."""
    if not tokens:
        return "<p><em>No image request prefilled yet.</em></p>"
    n_image = sum(image_mask)
    head = (
        f"<p><b>Prompt tokens</b>: {len(tokens)}, of them <b>{n_image} image placeholder(s)</b> "
        '(<span style="' + IMAGE_TOKEN_STYLE + ';padding:0 3px">pink</span>): the processor expanded the image '
        "into these; their embeddings are the vision tower's features, not the token's own.</p>"
    )
    chips = "".join(token_chips(tokens, image_mask))
    return f'<div class="flab-tokens" id="flab-image-tokens-list">{head}{chips}</div>'


def image_blocks(view: list, request_id: int) -> list[int]:
    """The KV blocks of request `request_id` that hold image placeholder tokens."""
    return [b.block for b in view if request_id in b.owners and getattr(b, "image_tokens", 0)]


def vision_share(steps: list) -> tuple[float, float]:
    """(seconds the vision tower ran, seconds of those steps) over `steps` (StepStats)."""
    return sum(getattr(s, "vision_s", 0.0) for s in steps), sum(s.duration for s in steps)


def image_prefill_summary(prefill, block_size: int) -> str:
    """What one image request's prefill shows: its image tokens, the blocks holding them, the vision tower's share."""
    blocks = image_blocks(prefill.kv_view, prefill.request_id)
    vision_s, total_s = vision_share(prefill.steps)
    n_image = sum(prefill.image_mask)
    shown = ", ".join(map(str, blocks[:24])) + (" …" if len(blocks) > 24 else "")
    lines = [
        f"**Image request #{prefill.request_id} prefilled** in {len(prefill.steps)} step(s): "
        f"{len(prefill.prompt_token_ids)} prompt tokens, **{n_image} image placeholder(s)**.",
        f"**KV blocks holding image features**: {len(blocks)} (blocks of {block_size} tokens: {shown or 'none'}), "
        "pink in the KV map above.",
    ]
    if vision_s > 0:
        lines.append(
            f"**Vision tower**: {vision_s * 1e3:.1f} ms of the {total_s * 1e3:.1f} ms these steps took "
            f"(**{100 * vision_s / max(total_s, 1e-9):.0f}%**); it runs once per request, at its first prefill step, "
            "and its features are kept for later chunks."
        )
    else:
        lines.append(
            "**Vision tower**: did not run: every image token came from the prefix cache "
            f"({prefill.cached_tokens} cached prompt tokens; same image and prompt as before)."
        )
    return "  \n".join(lines)
