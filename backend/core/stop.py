"""Stop strings, matched incrementally: each new token searches only the text that can hold a new match.

A match that ends in the new text starts at most `longest - 1` characters before it, so the search window is
the new text plus that overlap (and a few characters more, since a detokenizer may rewrite the last
characters of the text when a partial UTF-8 character completes). The cost per token is bounded by the stop
strings and the new text, not by the length of the output.
"""

from __future__ import annotations

REWRITE_SLACK = 8  # characters at the end of the text a detokenizer may still rewrite


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.hold = max(self.longest - 1, 0)  # characters held back from a stream: maybe a partial stop string
        self._scanned = 0  # text length already searched

    def __bool__(self) -> bool:
        return bool(self.stops)

    def found(self, text: str) -> bool:
        """Whether a stop string occurs in `text` (the output so far) in the part not searched before."""
        if not self.stops:
            return False
        start = max(0, min(self._scanned, len(text)) - self.hold - REWRITE_SLACK)
        self._scanned = len(text)
        window = text[start:]
        return any(s in window for s in self.stops)

    def first(self, text: str) -> int | None:
        """Where the first stop string starts in `text` (None: none occurs). Searches the whole text once."""
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None
