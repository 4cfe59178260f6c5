"""Column widths for the app's tables, so that no header word is split across lines ("req/ues/t"): Gradio sizes a
column by its data, not its header, and its column menu button takes room beside the header. A table wider than its
place scrolls as a whole (Gradio's table viewport); its cells wrap between words."""

from __future__ import annotations

CHAR_PX = 8  # one character of a header or cell at Gradio's default font, generously
PAD_PX = 44  # a cell's padding and the column menu button (⋮) beside a header


def fit_px(chars: int) -> int:
    """The width (px) of a column whose longest word has `chars` characters."""
    return round(max(1, chars) * CHAR_PX + PAD_PX)


def column_widths(headers: list[str], fit: dict[str, int | str] | None = None) -> list[str]:
    """Gradio's `column_widths` for `headers`: each column at least as wide as its longest header word; `fit` gives
    a column's longest data word in characters (int) or its width outright (a CSS width such as "30%")."""
    fit = fit or {}
    out = []
    for header in headers:
        hint = fit.get(header, 0)
        if isinstance(hint, str):
            out.append(hint)
            continue
        longest = max((len(word) for word in header.split()), default=1)
        out.append(f"{fit_px(max(longest, hint))}px")
    return out
