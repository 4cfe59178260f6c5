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
