"""A prompt refused by its size in bytes before it is tokenized: tokenizing a 1 MB prompt takes seconds of CPU,
and the token cap would refuse it afterwards anyway.

The byte cap follows from the token cap: a token of the vocabulary stands for at most B bytes of text, where B
is the longest vocabulary entry as text, in UTF-8 bytes, plus one (a decoder may drop a token's leading space);
read once per tokenizer (~0.25 s for SmolLM2's 49,152 entries, off the event loop). A prompt of more than
`token cap x B` bytes therefore has more tokens than the cap: refused without tokenizing it. The token cap is the
host's max prompt tokens (hosted default 4096) when set, else the context minus one (a prompt needs room for one
new token). Example: SmolLM2's longest entry is a newline and 80 spaces (81 bytes), so B = 82 and, hosted, a
prompt over 4096 x 82 = 335,872 bytes is refused at once. A tokenizer whose normalizer shrinks text (NFKC
ligatures, ...) could in principle fit more text per token; the decoder models this project serves do not
normalize so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


def longest_token_bytes(tokenizer) -> int:
    """B above: the longest entry of `tokenizer`'s vocabulary (added tokens included) as text, in UTF-8 bytes, plus
    one."""
    longest = 1
    for token in tokenizer.get_vocab():
        try:
            text = tokenizer.convert_tokens_to_string([token])
        except Exception:  # a tokenizer that cannot show one token alone: its raw form (longer, never shorter)
            text = token
        longest = max(longest, len(text.encode("utf-8", "surrogatepass")))
    return longest + 1


def text_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # a lone surrogate is refused later, with its own message


@dataclass
class PromptByteCap:
    """The byte cap of prompts for one server (the longest token remembered for the last tokenizer seen)."""

    _tokenizer: object = field(default=None, repr=False)
    _longest: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def token_bytes(self, tokenizer) -> int:
        with self._lock:
            if tokenizer is not self._tokenizer:
                self._longest = longest_token_bytes(tokenizer)
                self._tokenizer = tokenizer
            return self._longest

    def limit(self, tokenizer, token_cap: int) -> int:
        """Bytes a prompt may have when at most `token_cap` tokens are allowed."""
        return max(token_cap, 1) * self.token_bytes(tokenizer)

    def problem(self, tokenizer, token_cap: int, nbytes: int) -> str | None:
        """The message refusing a prompt of `nbytes` bytes, or None when it may fit."""
        if tokenizer is None:
            return None
        limit = self.limit(tokenizer, token_cap)
        if nbytes <= limit:
            return None
        return (
            f"the prompt is {nbytes} bytes: at most {token_cap} prompt tokens are allowed and no token of this "
            f"model covers more than {self.token_bytes(tokenizer)} bytes, so a prompt over {limit} bytes cannot "
            "fit: shorten it"
        )
