"""The output text of one sequence as it grows, token by token.

Decoding the whole output again for every new token costs O(n) per token: transformers' `decode` of 1000
tokens takes ~155 µs and of 2000 ~310 µs, so 5-10 ms of every step at batch 32 for long answers. With a
fast tokenizer the `tokenizers` library's `DecodeStream` returns just the text each token adds (it holds
back a partial UTF-8 character until the next token completes it). `finish` decodes the whole output
once, so the final text is `tokenizer.decode(token_ids)` (a trailing partial character included).

The one place the two decoders disagree is a run of byte-fallback tokens (`<0xE6>`...) that is not valid
UTF-8 as a whole: the stream may already have shown a complete character of the run where the full decode
writes one U+FFFD per byte. The final text then stays the streamed one, so what was streamed is a prefix
of the final text. If DecodeStream gives up on such a run (it raises), the rest of that sequence is
decoded in full per token, as for a tokenizer without streaming (and as every sequence was before): the
full decode may then rewrite characters already shown.

Tokenizers that decode differently from their Rust backend (a slow or custom Python tokenizer, or
transformers' Python-side clean-up of spaces before punctuation) decode in full for every token.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - tokenizers < 0.21
    DecodeStream = None


def streams(tokenizer) -> bool:
    """True when DecodeStream over the tokenizer's Rust backend gives what its `decode` gives."""
    return (
        DecodeStream is not None
        and isinstance(tokenizer, PreTrainedTokenizerFast)
        and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    )


class Detokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens) if streams(tokenizer) else None
        self.text = ""

    @property
    def streaming(self) -> bool:
        """False for a tokenizer without streaming, and after DecodeStream gave up on this sequence."""
        return self._stream is not None

    def add(self, token_ids: list[int]) -> str:
        """`token_ids`: the whole output so far, its last token new. Returns the text so far."""
        if self._stream is not None:
            try:
                chunk = self._stream.step(self.tokenizer.backend_tokenizer, token_ids[-1])
            except Exception:  # an undecodable byte run: decode in full from here on
                self._stream = None
            else:
                self.text += chunk or ""
                return self.text
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        return self.text

    def finish(self, token_ids: list[int]) -> str:
        """The text of the whole output after one full decode (e.g. with a trailing partial character)."""
        full = self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
        if self._stream is None or full.startswith(self.text):
            self.text = full
        return self.text
