"""backend/core/detokenizer.py: streamed output text equals transformers' decode of the same tokens (every step's
text a prefix of it, the final text equal), with one full decode per request instead of one per token."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import PreTrainedTokenizerFast

from backend import Engine, SamplingParams
from backend.core.detokenizer import Detokenizer, streams
from backend.loading.tiny_models import CORPUS, build_tokenizer

TEXT = "The quick brown fox, héllo wörld: 日本語 and 🎉 emoji.  Two  spaces\nand a new line."


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: '▁' for spaces, byte fallback (<0xNN> vocabulary entries) for characters
    outside the vocabulary."""
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(
        [CORPUS] * 4,
        trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    vocab = trained.get_vocab()
    for i in range(256):  # byte tokens are ordinary vocabulary entries, as in Llama's tokenizer.model
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]  # [[left, right], ...]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte-level BPE": lambda: build_tokenizer(512), "sentencepiece + byte fallback": sentencepiece_style}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_streamed_text_is_the_decode_of_the_same_tokens(kind):
    tok = TOKENIZERS[kind]()
    assert streams(tok)
    ids = tok.encode(TEXT, add_special_tokens=False)  # multi-byte characters split over several tokens
    for skip in (True, False):
        detok = Detokenizer(tok, skip)
        for i in range(1, len(ids) + 1):
            text = detok.add(ids[:i])
            assert TEXT.startswith(text) and "\ufffd" not in text  # a partial character waits for its last byte
        assert detok.finish(ids) == TEXT == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_random_tokens(kind):
    """Random ids make invalid byte runs. While a sequence streams, what was shown stays a prefix of the final
    text (the full decode, except inside a byte-fallback run that is invalid as a whole, where the stream
    already showed the valid part); a sequence DecodeStream gave up on ends with the full decode."""
    tok = TOKENIZERS[kind]()
    rng = random.Random(0)
    streamed = 0
    for _ in range(150):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 50))]
        detok = Detokenizer(tok)
        shown = [detok.add(ids[:i]) for i in range(1, len(ids) + 1)]
        final = detok.finish(ids)
        full = tok.decode(ids, skip_special_tokens=True)
        if detok.streaming:
            streamed += 1
            assert all(final.startswith(text) for text in shown)
            assert final == full or kind != "byte-level BPE"
        else:
            assert final == full
    assert streamed == 150 if kind == "byte-level BPE" else streamed > 0


class CountingTokenizer(PreTrainedTokenizerFast):
    decodes = 0

    def decode(self, *args, **kwargs):
        type(self).decodes += 1
        return super().decode(*args, **kwargs)


def test_one_full_decode_per_request_and_a_fallback(tmp_path):
    build_tokenizer(512).save_pretrained(tmp_path)
    tok = CountingTokenizer.from_pretrained(tmp_path)
    ids = tok.encode(TEXT)
    detok = Detokenizer(tok)
    for i in range(1, len(ids) + 1):
        detok.add(ids[:i])
    assert CountingTokenizer.decodes == 0 and detok.finish(ids) == tok.decode(ids)
    # transformers' Python-side clean-up of spaces is not in the Rust decoder: decode in full every token
    tok.clean_up_tokenization_spaces = True
    assert not streams(tok)
    detok, CountingTokenizer.decodes = Detokenizer(tok), 0
    for i in range(1, len(ids) + 1):
        assert detok.add(ids[:i]) == tok.decode(ids[:i])
    assert CountingTokenizer.decodes == 2 * len(ids)


def test_engine_text_and_stop_strings(tiny_model):
    with Engine(str(tiny_model("llama")), device="cpu", num_kv_blocks=64) as engine:
        params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)
        outs = engine.generate(["the cat sat on", "héllo wörld 日本"], params)
        for out in outs:
            assert out.text == engine.tokenizer.decode(out.token_ids)
        text = outs[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert len(stop) == 3 and stop in text
        stopped = engine.generate(
            "the cat sat on", SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
        )[0]
        assert stopped.finish_reason == "stop" and stopped.text == text[: text.find(stop)]
