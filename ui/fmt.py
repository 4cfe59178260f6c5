"""Number formatting for the text views and summaries: the engine's one formatter (backend/units.py)."""

from __future__ import annotations

from backend.units import format_bytes as fmt_bytes
from backend.units import format_count as fmt_count

__all__ = ["fmt_bytes", "fmt_count"]
