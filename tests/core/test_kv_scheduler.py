"""Allocator and scheduler invariants (property-based), without a model."""

from hypothesis import given, settings
from hypothesis import strategies as st

from backend.core.kv_cache import BlockAllocator, block_hashes, block_keys
from backend.core.sampling import SamplingParams
from backend.core.scheduler import Scheduler
from backend.core.sequence import Sequence


def test_prefix_blocks_are_shared_and_come_back_after_free():
    alloc = BlockAllocator(num_blocks=8, block_size=4)
    tokens = list(range(10))
    keys = block_keys(tokens, 4)
    assert len(keys) == 2  # only full blocks
    a = alloc.allocate(3)
    for b, (h, key) in zip(a, keys):
        alloc.register(b, h, key)
    shared, _ = alloc.match_prefix(tokens)
    assert shared == a[:2] and alloc.ref_count[a[0]] == 2
    alloc.free(a)
    alloc.free(shared)
    assert alloc.num_free == 8
    again, _ = alloc.match_prefix(tokens)  # freed but still cached
    assert again == a[:2]
    alloc.free(again)


def test_hash_chain_depends_on_the_whole_prefix():
    assert block_hashes([1, 2, 3, 4, 5, 6], 2)[1] != block_hashes([9, 9, 3, 4], 2)[1]


def _run_steps(sched: Scheduler, ops: list[tuple[str, int]], seqs: list[Sequence]) -> None:
    for op, arg in ops:
        live = [s for s in seqs if not s.is_finished]
        if op == "add":
            seq = Sequence(len(seqs), [arg % 7] * (1 + arg % 23), SamplingParams(max_new_tokens=1 + arg % 5))
            seqs.append(seq)
            sched.add(seq)
        elif op == "abort" and live:
            sched.finish(live[arg % len(live)], "abort")
        elif op == "step":
            batch = sched.schedule()
            sched.update(batch)
            for seq, sample in zip(batch.seqs, batch.sample):
                if sample and not seq.is_finished:
                    seq.output_token_ids.append(arg % 7)  # a fake sampled token
                    if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                        sched.finish(seq, "length")
        owned = [s.block_table for s in sched.running + list(sched.waiting)]
        sched.allocator.check_invariants(owned)
        # no block is owned twice by one sequence, and only shared (prefix) blocks by several
        for table in owned:
            assert len(table) == len(set(table))


ops_strategy = st.lists(st.tuples(st.sampled_from(["add", "step", "step", "abort"]), st.integers(0, 1000)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops_strategy, num_blocks=st.integers(4, 16), budget=st.integers(1, 40), prefix=st.booleans())
def test_blocks_are_all_free_after_any_sequence_of_operations(ops, num_blocks, budget, prefix):
    alloc = BlockAllocator(num_blocks, block_size=4, enable_prefix_caching=prefix)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=budget)
    seqs: list[Sequence] = []
    _run_steps(sched, ops, seqs)
    # drain: everything left either finishes or is aborted
    for _ in range(500):
        if not sched.has_work():
            break
        _run_steps(sched, [("step", 1)], seqs)
    for seq in seqs:
        sched.finish(seq, "abort")
    assert alloc.num_free == num_blocks
    assert all(r == 0 for r in alloc.ref_count)
    assert not sched.running and not sched.waiting


def test_scheduler_finishes_everything_under_memory_pressure():
    """More work than blocks: preemption (recompute) keeps every request moving, none is lost."""
    alloc = BlockAllocator(num_blocks=6, block_size=4)
    sched = Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=16)
    seqs = [Sequence(i, list(range(i, i + 9)), SamplingParams(max_new_tokens=6)) for i in range(5)]
    for s in seqs:
        sched.add(s)
    for _ in range(1000):
        if not sched.has_work():
            break
        _run_steps(sched, [("step", 3)], seqs)
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 6 for s in seqs)
    assert sched.num_preemptions > 0
    assert alloc.num_free == 6
