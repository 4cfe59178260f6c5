"""The one place numbers become text for people: bytes (binary units) and counts (K / M / B)."""

from __future__ import annotations


def format_bytes(n: float | None) -> str:
    """1536 -> '1.50 KiB', 5e8 -> '477 MiB'... binary units, as GPU memory is reported; None -> '—'."""
    if n is None:
        return "—"
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value /= 1024
    else:
        unit = "TiB"
    if unit == "B":
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.2f} {unit}" if value < 10 else f"{sign}{value:,.1f} {unit}"


def format_count(n: float | None) -> str:
    """1234 -> '1.23K', 45_600 -> '45.6K', 135e6 -> '135M' (three significant digits); None -> '—'."""
    if n is None:
        return "—"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            value = n / div
            return (
                f"{value:.2f}{suffix}"
                if value < 10
                else f"{value:.1f}{suffix}"
                if value < 100
                else f"{value:.0f}{suffix}"
            )
    return str(int(n))
