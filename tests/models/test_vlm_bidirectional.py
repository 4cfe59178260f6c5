"""Bidirectional spans (Gemma 3: one image's tokens attend to each other both ways at the prefill): the torch paged
attention's mask against a dense reference, the spans a step hands the attention, the scheduler's chunk rule (a chunk
never ends inside a span) and its prefix-cache stop, and the Triton backend handing a step with spans to the torch
path. The end-to-end exactness against HF generate() is in test_vlm_images.py."""

from __future__ import annotations

import math

import pytest
import torch

from backend.core.errors import UnsupportedModelError
from backend.core.kv_cache import BlockAllocator
from backend.core.sampling import SamplingParams
from backend.core.scheduler import Scheduler
from backend.core.sequence import Sequence
from backend.layers.attention_backends import TorchAttention, TritonAttention
from backend.multimodal.inputs import ImageInputs
from backend.multimodal.step import step_bidirectional_spans
from flab_kernels.attention_args import BidirectionalSpan, PagedAttentionArgs
from flab_kernels.attention_torch import build_plan, paged_attention_planned, paged_attention_torch

BS = 4  # block size


def dense_reference(q, k, v, spans, cached: int, scale: float, window: int | None):
    """Attention of one sequence's new tokens (the last q.shape[0] of k.shape[0]) with an explicit mask, as
    transformers composes it: (causal OR both in one span) AND sliding window."""
    n, length = q.shape[0], k.shape[0]
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for qi in range(n):
        p = cached + qi
        allowed = [j for j in range(length) if j <= p or any(s <= p < e and s <= j < e for s, e in spans)]
        if window is not None:
            allowed = [j for j in allowed if j > p - window]
        for h in range(q.shape[1]):
            kk, vv = k[allowed, h // group], v[allowed, h // group]  # (a, D)
            w = torch.softmax(kk @ q[qi, h] * scale, dim=0)
            out[qi, h] = w @ vv
    return out


def paged(k_all, v_all, num_blocks: int):
    """Write one sequence's K/V (L, Hkv, D) into blocks 0.. of a fresh cache."""
    length, hkv, d = k_all.shape
    k_cache = torch.zeros(num_blocks, BS, hkv, d)
    v_cache = torch.zeros(num_blocks, BS, hkv, d)
    k_cache.view(-1, hkv, d)[:length] = k_all
    v_cache.view(-1, hkv, d)[:length] = v_all
    return k_cache, v_cache


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("cached", [0, 5])
def test_torch_prefill_honours_bidirectional_spans(window, cached):
    torch.manual_seed(0)
    length, hq, hkv, d = 14, 4, 2, 8
    spans = [(3, 7), (9, 13)]  # with 5 tokens cached the first span is partly in the cache: its rest still sees them
    k_all, v_all = torch.randn(length, hkv, d), torch.randn(length, hkv, d)
    n = length - cached
    q = torch.randn(n, hq, d)
    k_cache, v_cache = paged(k_all, v_all, math.ceil(length / BS))
    table = torch.arange(math.ceil(length / BS), dtype=torch.int32)[None]
    plan = build_plan([0, n], [length], table, BS)
    scale = d**-0.5
    bidir = [BidirectionalSpan(0, s, e) for s, e in spans]
    got = paged_attention_planned(q, k_cache, v_cache, plan, scale, sliding_window=window, bidirectional=bidir)
    want = dense_reference(q, k_all, v_all, spans, cached, scale, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    causal = paged_attention_planned(q, k_cache, v_cache, plan, scale, sliding_window=window)
    assert not torch.allclose(causal, want, atol=1e-3)  # the spans change the result: the check above can fail


def test_spans_apply_to_their_own_sequence_only_and_reach_torch_from_the_triton_backend():
    torch.manual_seed(1)
    hq, hkv, d = 2, 1, 8
    lens = [8, 6]
    k_cache, v_cache = torch.randn(4, BS, hkv, d), torch.randn(4, BS, hkv, d)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    q = torch.randn(sum(lens), hq, d)
    qsl = torch.tensor([0, 8, 14], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    span = (BidirectionalSpan(1, 1, 5),)  # in the second sequence
    with_span = paged_attention_torch(q, k_cache, v_cache, qsl, seq_lens, tables, 0.3, bidirectional=span)
    plain = paged_attention_torch(q, k_cache, v_cache, qsl, seq_lens, tables, 0.3)
    torch.testing.assert_close(with_span[:8], plain[:8])  # the first sequence: causal
    assert not torch.allclose(with_span[8:13], plain[8:13])  # the span's queries but its last see later keys
    torch.testing.assert_close(with_span[13:], plain[13:])  # past the span: causal
    args = PagedAttentionArgs(q, k_cache, v_cache, qsl, seq_lens, tables, 0.3, bidirectional=span)
    torch.testing.assert_close(TritonAttention().attend(args, None), with_span)  # handed to the torch path
    metadata = TorchAttention().prepare(qsl.tolist(), lens, tables, BS)
    torch.testing.assert_close(TorchAttention().attend(args, metadata), with_span)


def image_seq(
    prompt_len: int, spans: tuple, image_positions: list[int] | None = None, salt_hash: int = 7, rid: str = "r"
) -> Sequence:
    positions = image_positions if image_positions is not None else [p for s, e in spans for p in range(s, e)]
    images = ImageInputs({}, torch.tensor(positions), salt_hash, len(spans), bidirectional_spans=spans)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    return Sequence(rid, list(range(1, prompt_len + 1)), params, None, images=images)


def run_prefill(scheduler: Scheduler) -> list[tuple[int, int]]:
    """Schedule until every prompt is computed; (first position, tokens) of each chunk."""
    chunks = []
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in scheduler.running + list(scheduler.waiting)):
        batch = scheduler.schedule()
        chunks += [(s.num_computed_tokens, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
        scheduler.update(batch)
        for seq in batch.seqs:
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(0)  # a sampled token: the sequence decodes on
    return chunks


def test_chunks_never_end_inside_a_span():
    spans = ((3, 9), (12, 15))
    seq = image_seq(20, spans)
    scheduler = Scheduler(BlockAllocator(64, BS, enable_prefix_caching=False), 4, max_num_batched_tokens=4)
    scheduler.add(seq)
    chunks = run_prefill(scheduler)
    # budget 4: [0, 3) ends at the span's start, [3, 9) takes the span whole (6 > 4), [9, 12) ends at the next
    assert chunks == [(0, 3), (3, 6), (9, 3), (12, 4), (16, 4)]
    for start, n in chunks:
        assert not any(s < start + n < e for s, e in spans)


def test_step_hands_the_attention_the_spans_it_computes_whole():
    seq = image_seq(20, ((3, 9), (12, 15)))
    seq.num_computed_tokens = 3
    assert step_bidirectional_spans([seq], [6]) == (BidirectionalSpan(0, 3, 9),)
    seq.num_computed_tokens = 5  # a prefix-cache hit inside the span: the rest of it sees its later keys
    assert step_bidirectional_spans([seq], [4]) == (BidirectionalSpan(0, 3, 9),)
    seq.num_computed_tokens = 8  # only the span's last token left: causal is the same
    assert step_bidirectional_spans([seq], [4]) == ()
    seq.num_computed_tokens = 3
    with pytest.raises(RuntimeError, match="inside the bidirectional span"):
        step_bidirectional_spans([seq], [4])


def test_prefix_cache_hits_stop_at_a_span_that_holds_text_tokens():
    """Image tokens' KV depends on their image (in the hash's salt) and earlier tokens; a span with text tokens would
    depend on later prompt tokens the block hashes do not cover: no hit reaches into it."""
    allocator = BlockAllocator(64, BS, enable_prefix_caching=True)
    scheduler = Scheduler(allocator, 4, max_num_batched_tokens=64)
    for spans, positions, hit in [
        (((2, 11),), None, 16),  # image tokens only: a hit covers the span (the last block holds the last token)
        (((2, 11),), [2, 3, 4, 5, 6, 7, 8], 0),  # tokens 9 and 10 are text: no hit from position 2 on (block 0)
    ]:
        scheduler.add(image_seq(17, spans, positions, rid="first"))
        run_prefill(scheduler)
        for seq in list(scheduler.running):
            scheduler.finish(seq, "length")
        again = image_seq(17, spans, positions, rid="again")
        scheduler.add(again)
        scheduler.schedule()
        assert again.num_cached_tokens == hit
        scheduler.finish(again, "length")
        allocator.reset_prefix_cache()


def test_gemma4_spans_come_from_its_own_grouping_and_its_image_requests_are_refused(tmp_path):
    """Gemma 4 runs text exactly (the sweep); with use_bidirectional_attention="vision" its spans are each image's
    tokens (mm_token_type_ids 1 or 2, grouped by its own get_block_sequence_ids_for_mask), with None it is causal.
    Its image requests are refused: its language model's per-layer inputs come from the input ids."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from backend.models.vlm import bidirectional_spans, check_image_text_class, image_input_refusal
    from tests.models.vlm_sweep import build_sweep_vlm

    build_sweep_vlm("gemma4", tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    cls = type(AutoModelForImageTextToText.from_config(config))
    types = torch.tensor([[0, 1, 1, 1, 0, 0, 2, 2, 0]])  # an image's 3 tokens, a video frame's 2
    assert bidirectional_spans(check_image_text_class(cls, config), {"mm_token_type_ids": types}) == ()
    config.get_text_config().use_bidirectional_attention = "vision"
    rule = check_image_text_class(cls, config)
    assert bidirectional_spans(rule, {"mm_token_type_ids": types}) == ((1, 4), (6, 8))
    assert bidirectional_spans(rule, {"token_type_ids": types}) == ()  # not its key: nothing read
    config.get_text_config().use_bidirectional_attention = "all"
    with pytest.raises(UnsupportedModelError, match="Only Gemma 3's and Gemma 4's spans"):
        check_image_text_class(cls, config)
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert "per-layer inputs" in image_input_refusal(hf)
