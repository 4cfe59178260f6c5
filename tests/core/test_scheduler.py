"""The scheduler alone (backend/core/scheduler.py), no model: admission, chunked prefill, decode first, preemption,
fairness across owners."""

from __future__ import annotations

from tests.core.helpers import make_scheduler, make_seq, run_to_end, step


def test_admission_is_fifo_and_capped_by_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(i, [i] * 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = step(sched)
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2]
    run_to_end(sched)
    assert all(s.is_finished and s.finish_reason == "length" for s in seqs)


def test_a_long_prompt_is_chunked_under_the_token_budget():
    sched = make_scheduler(budget=5)
    seq = make_seq(0, list(range(12)), max_new_tokens=2)
    sched.add(seq)
    chunks = []
    while not seq.output_token_ids:
        batch = step(sched)
        chunks.append((batch.num_new_tokens, batch.sample))
    assert chunks == [([5], [False]), ([5], [False]), ([2], [True])]  # only the last chunk samples


def test_decodes_go_first_and_new_prompts_take_what_is_left():
    sched = make_scheduler(budget=6)
    first = make_seq(0, [1, 2, 3], max_new_tokens=8)
    sched.add(first)
    step(sched)  # prefill of the first
    sched.add(make_seq(1, list(range(10))))
    batch = step(sched)
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    assert batch.num_new_tokens == [1, 5]  # one decode, then the rest of the budget for the new prompt


def test_preemption_frees_the_newest_and_it_is_recomputed_first():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64)
    old, new = make_seq(0, list(range(7)), max_new_tokens=6), make_seq(1, list(range(20, 27)), max_new_tokens=6)
    sched.add(old)
    sched.add(new)
    step(sched)  # both prefilled: 2 blocks each, the cache is full
    assert sched.allocator.num_free == 0
    step(sched)  # both decode into their 8th slot
    step(sched)  # the old one needs a 3rd block: the newest running one is preempted
    assert sched.num_preemptions == 1 and new.num_preemptions == 1
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert list(sched.waiting) == [new] and sched.running == [old]
    run_to_end(sched)
    assert old.is_finished and new.is_finished and len(new.output_token_ids) == 6
    assert sched.allocator.num_free == 4


def test_a_preempted_sequence_gets_its_full_blocks_back_from_the_prefix_cache():
    sched = make_scheduler(num_blocks=5, block_size=4)
    a, b = make_seq(0, list(range(8)), max_new_tokens=9), make_seq(1, list(range(50, 58)), max_new_tokens=2)
    sched.add(a)
    sched.add(b)
    step(sched)
    while b.num_preemptions == 0 and not b.is_finished:
        step(sched)
    if b.num_preemptions:  # its prompt blocks were freed with their hashes: readmission hits them
        while b.status.value == "waiting":
            step(sched)
        assert b.num_cached_tokens > 0
    run_to_end(sched)


def test_owners_share_the_prefill_budget_and_admission():
    sched = make_scheduler(budget=8, max_num_seqs=4)
    hog = [make_seq(i, list(range(100 * i, 100 * i + 30)), owner="hog") for i in range(3)]
    guest = make_seq(9, list(range(900, 906)), owner="guest")
    for s in hog + [guest]:
        sched.add(s)
    first = step(sched)
    assert [s.seq_id for s in first.seqs] == [0] and first.num_new_tokens == [8]  # one owner known to run
    batch = step(sched)
    owners = dict(zip([s.owner for s in batch.seqs], batch.num_new_tokens))
    assert owners == {"hog": 4, "guest": 4}  # an equal share of the step each, not first come first served
    assert guest in sched.running and hog[1] not in sched.running  # the owner with fewer running goes next


def test_max_running_per_owner_caps_one_owner():
    sched = make_scheduler(max_num_seqs=8, per_owner=2)
    for i in range(4):
        sched.add(make_seq(i, [i] * 3, owner="a"))
    sched.add(make_seq(9, [9] * 3, owner="b"))
    step(sched)
    assert sorted((s.owner, s.seq_id) for s in sched.running) == [("a", 0), ("a", 1), ("b", 9)]
    run_to_end(sched)


def test_finish_frees_a_waiting_or_running_sequence_at_once():
    sched = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq(0, [1] * 9, max_new_tokens=50), make_seq(1, [2] * 9)
    sched.add(running)
    sched.add(waiting)
    step(sched)
    sched.finish(waiting, "abort")
    sched.finish(running, "abort")
    assert not sched.has_work() and sched.allocator.num_free == sched.allocator.num_blocks
    assert running.finish_reason == waiting.finish_reason == "abort"
