"""Prefix caching in the allocator and the scheduler, no model: hits, the hit verified against the block's
tokens (a forced hash collision is a miss), the cache salt, prompt scoring without hits."""

from __future__ import annotations

import backend.core.kv_cache as kv_cache
from backend.core.kv_cache import BlockAllocator, block_keys
from backend.core.sequence import prefix_salt
from tests.core.helpers import make_scheduler, make_seq, run_to_end

PROMPT = list(range(100, 113))  # 13 tokens: 3 full blocks of 4 (the last token is always computed)


def _served(sched, seq) -> int:
    """Run `seq` alone to the end; how many of its prompt tokens came from the prefix cache."""
    sched.add(seq)
    run_to_end(sched)
    return seq.num_cached_tokens


def _published(alloc: BlockAllocator, tokens: list[int], salt: str | None = None) -> list[int]:
    blocks = alloc.allocate(len(tokens) // alloc.block_size)
    for b, (h, key) in zip(blocks, block_keys(tokens, alloc.block_size, salt=salt)):
        alloc.register(b, h, key)
    alloc.free(blocks)
    return blocks


def test_a_repeated_prompt_hits_its_full_blocks():
    sched = make_scheduler()
    assert _served(sched, make_seq(0, PROMPT)) == 0
    assert _served(sched, make_seq(1, PROMPT)) == 12
    assert _served(sched, make_seq(2, PROMPT[:9] + [7, 7, 7, 7])) == 8  # shares the first two blocks
    assert sched.allocator.prefix_hits == 5


def test_a_forced_hash_collision_is_a_miss_not_another_prompts_kv(monkeypatch):
    monkeypatch.setattr(kv_cache, "hash_block", lambda key: b"same")  # every block hashes alike
    alloc = BlockAllocator(8, 4)
    cached = _published(alloc, [1, 2, 3, 4])
    blocks, _ = alloc.match_prefix([5, 6, 7, 8, 9])  # other tokens under the same hash
    assert blocks == [] and alloc.prefix_collisions == 1
    blocks, _ = alloc.match_prefix([1, 2, 3, 4, 1, 2, 3, 4, 0])  # block 0 verified; block 1's parent differs
    assert blocks == cached and alloc.prefix_collisions == 2


def test_collisions_through_the_scheduler_never_share_blocks(monkeypatch):
    monkeypatch.setattr(kv_cache, "hash_block", lambda key: b"same")
    sched = make_scheduler()
    first, other = make_seq(0, PROMPT), make_seq(1, [t + 1 for t in PROMPT])
    assert _served(sched, first) == 0
    assert _served(sched, other) == 0
    assert sched.allocator.prefix_collisions >= 1
    assert _served(sched, make_seq(2, PROMPT)) == 4  # its first block is verified; the chain's next hash collides


def test_a_cache_salt_keeps_prefixes_apart():
    sched = make_scheduler()
    assert _served(sched, make_seq(0, PROMPT, cache_salt="alice")) == 0
    assert _served(sched, make_seq(1, PROMPT)) == 0  # unsalted: not alice's blocks
    assert _served(sched, make_seq(2, PROMPT, cache_salt="bob")) == 0
    assert _served(sched, make_seq(3, PROMPT, cache_salt="alice")) == 12
    assert _served(sched, make_seq(4, PROMPT)) == 12
    assert sched.allocator.prefix_collisions == 0  # different salts hash differently, not by luck of the check


def test_salted_hashes_differ_from_the_first_block_on():
    plain, salted = block_keys(PROMPT, 4), block_keys(PROMPT, 4, salt="s")
    assert all(a[0] != b[0] for a, b in zip(plain, salted))
    assert salted[0][1].salt == "s" and salted[1][1].salt is None  # the salt is in the first key only


def test_prompt_scoring_takes_no_hits_but_publishes():
    sched = make_scheduler()
    assert _served(sched, make_seq(0, PROMPT, prompt_logprobs=0)) == 0
    assert _served(sched, make_seq(1, PROMPT, prompt_logprobs=0)) == 0
    assert _served(sched, make_seq(2, PROMPT)) == 12


def test_reset_forgets_every_prefix():
    sched = make_scheduler()
    _served(sched, make_seq(0, PROMPT))
    sched.allocator.reset_prefix_cache()
    assert sched.allocator.num_cached_free == 0
    assert _served(sched, make_seq(1, PROMPT)) == 0


def test_the_least_recently_freed_block_is_evicted_first():
    alloc = BlockAllocator(2, 4)
    first = _published(alloc, [1, 2, 3, 4])
    second = _published(alloc, [5, 6, 7, 8])
    assert alloc.allocate(1) == first  # reuses the least recently freed block: its prefix is gone
    assert alloc.match_prefix([1, 2, 3, 4, 0])[0] == []
    assert alloc.match_prefix([5, 6, 7, 8, 0])[0] == second


def test_the_prefix_salt_is_composed_unambiguously():
    """One composition (backend/core/sequence.prefix_salt) of owner, cache_salt and image hash: no choice of one part
    spells another combination, and a request with none of them stays unsalted (shared by all such requests)."""
    assert prefix_salt(None, None, None) is None
    combos = [
        ("x", None, None),
        (None, "owner:x", None),
        (None, "x", None),
        ("x", "", None),
        (None, "", None),
        (None, None, 7),
        (None, "\x00images:7", None),
        ("x", None, 7),
        ("x\x00y", None, None),
        ("x", "y", None),
    ]
    salts = [prefix_salt(*c) for c in combos]
    assert None not in salts and len(set(salts)) == len(combos)


def test_a_visitor_salt_and_an_anonymous_cache_salt_share_no_block():
    """Before, the owner salt `owner:x` was spelled like an anonymous request's cache_salt "owner:x"."""
    sched = make_scheduler()
    visitor = make_seq(0, PROMPT, prefix_salt=prefix_salt("x", None, None))
    assert _served(sched, visitor) == 0
    assert _served(sched, make_seq(1, PROMPT, cache_salt="owner:x")) == 0
    assert _served(sched, make_seq(2, PROMPT, prefix_salt=prefix_salt("x", None, None))) == 12
