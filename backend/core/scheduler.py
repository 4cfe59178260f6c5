"""Continuous batching: who runs this step and how many new tokens each.

Every step has a token budget (max_num_batched_tokens). Running sequences go first (decodes, and
the next chunk of prefills already started), then waiting ones are admitted in arrival order with
their prompt chunked to what is left of the budget. When the cache runs out of blocks the most
recently admitted running sequence is preempted: its blocks are freed and it goes back to the front
of the queue, to be recomputed later (its full blocks usually come back from the prefix cache).

Fairness across owners (a request's `owner`: a visitor of the app, an API key): with several owners
waiting or running, each owner's prefill chunks take at most an equal share of the step's budget, the next
request admitted is the oldest of the owner with the fewest running sequences, and `max_running_per_owner`
caps how many sequences one owner runs at once. With one owner (the default) it is plain FIFO.

Bidirectional spans (an image-text request's tokens that attend to each other both ways, Gemma 3's images) are never
split across steps: a chunk that would end inside a span ends at the span's start, and a chunk that starts at (or
inside) a span takes the rest of it whole, even past the step's token budget. A prefix-cache hit stops at the start
of a span that holds text tokens (their KV depends on later tokens of the prompt, which the block hashes do not
cover; a span of image tokens only depends on the images, which the hashes' salt covers).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass

from backend.core.kv_cache import BlockAllocator, block_keys
from backend.core.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence, this step
    sample: list[bool]  # whether the step reaches the sequence's last known token (then it samples)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for s, n in zip(self.seqs, self.num_new_tokens) if s.num_computed_tokens < len(s.prompt_token_ids))

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_running_per_owner: int | None = None,
    ) -> None:
        self.allocator = allocator
        self._cap = max_running_per_owner or max_num_seqs
        self.block_size = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- scheduling -------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [], [])
        share = self._prefill_share(budget)
        prefill_used: Counter[str | None] = Counter()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n > 1 and share is not None:  # a prefill chunk: at most its owner's share of this step
                n = min(n, share - prefill_used[seq.owner])
                if n <= 0:
                    i += 1
                    continue
            n = self._chunk(seq, n)
            while not self._grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break  # seq preempted itself: everything after it was preempted too
            self._add_to_batch(batch, seq, n)
            if n > 1:
                prefill_used[seq.owner] += n
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if seq is None or not self._admit(seq, budget):
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            n = self._chunk(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            self._add_to_batch(batch, seq, n)
            budget -= n
        return batch

    def _prefill_share(self, budget: int) -> int | None:
        """With requests of several owners waiting or running, each owner's prefill chunks take at most an
        equal share of the step's token budget (None: one owner, no limit)."""
        owners = {s.owner for s in self.running} | {s.owner for s in self.waiting}
        return budget // len(owners) if len(owners) > 1 else None

    def _next_waiting(self) -> Sequence | None:
        """The waiting sequence to admit next: the oldest of the owner with the fewest running sequences
        (a preempted sequence, at the front of the queue, goes first), skipping owners at their cap."""
        running = Counter(s.owner for s in self.running)
        best = None
        for seq in self.waiting:
            n = running[seq.owner]
            if n >= self._cap:
                continue
            if best is None and seq.num_preemptions:  # the first admissible one was preempted: it goes first
                return seq
            if best is None or n < running[best.owner]:
                best = seq
                if n == 0:
                    break
        return best

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> int:
        """`n` new tokens of `seq` moved so that the chunk splits no bidirectional span (see the module doc)."""
        start = seq.num_computed_tokens
        for s, e in seq.images.bidirectional_spans if seq.images is not None else ():
            if s < start + n < e:
                return s - start if s > start else e - start
        return n

    @staticmethod
    def _cacheable(seq: Sequence) -> int:
        """How many leading tokens of `seq` may come from the prefix cache: up to the first span with text tokens."""
        images = seq.images
        for s, e in images.bidirectional_spans if images is not None else ():
            pos = images.placeholder_positions
            if int(((pos >= s) & (pos < e)).sum()) < e - s:
                return s
        return seq.num_tokens

    def _add_to_batch(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.sample.append(seq.num_computed_tokens + n == seq.num_tokens)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make the block table cover `num_tokens` tokens; False when the cache is full."""
        need = math.ceil(num_tokens / self.block_size) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _admit(self, seq: Sequence, budget: int) -> bool:
        tokens = seq.all_token_ids
        # Leave at least one token to compute: the step must produce logits for the last one.
        # A request scoring its prompt (prompt_logprobs) computes every position: no prefix-cache hits (as vLLM);
        # its blocks are still published for later requests.
        cached, hashes = (
            ([], [])
            if seq.params.prompt_logprobs is not None
            else self.allocator.match_prefix(tokens[: min(len(tokens) - 1, self._cacheable(seq))], seq.prefix_salt)
        )
        seq.block_table = cached
        seq.num_computed_tokens = len(cached) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        seq.block_hashes = hashes
        n = self._chunk(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
        if not self._grow(seq, seq.num_computed_tokens + n):
            self.allocator.free(seq.block_table)
            seq.block_table, seq.block_hashes, seq.num_computed_tokens, seq.num_cached_tokens = [], [], 0, 0
            return False
        seq.status = SeqStatus.RUNNING
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed_tokens = [], [], 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # --- after the forward pass ---------------------------------------------------------------

    def update(self, batch: ScheduledBatch) -> None:
        """Advance computed counts, publish newly full blocks to the prefix cache. (The engine appends the
        sampled tokens and decides on finishing, since it owns detokenization and stop strings, via `finish`.)"""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed_tokens += n
            done = len(seq.block_hashes)
            full = seq.num_computed_tokens // self.block_size
            if full > done:
                tokens = seq.all_token_ids[: full * self.block_size]
                prev = seq.block_hashes[-1] if done else None
                new = block_keys(tokens, self.block_size, done, prev, seq.prefix_salt)
                for b, (h, key) in zip(seq.block_table[done:full], new):
                    self.allocator.register(b, h, key)
                seq.block_hashes.extend(h for h, _ in new)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence wherever it is and free its blocks at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.perf_counter()
