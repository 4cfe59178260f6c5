"""The requests an engine holds, and what their sampled tokens become: text, stop checks, deltas, final outputs.

`RequestBook` is the registry the engine's loop owns (only the thread that holds the engine's state lock touches
it): `append_token` takes one sampled token through detokenization and the stop rules, `publish` turns what is
new since the last publish into a `StreamDelta`, `deliver` pushes the published deltas to their consumers (the
engine calls it once it has published the state snapshot that matches them, so a consumer holding its final
delta never reads a snapshot that still holds its request), `fail` finishes requests with an error without ever
raising. A finished request is dropped from the book as its final delta is published.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from backend.core.detokenizer import Detokenizer
from backend.core.metrics import StepStats
from backend.core.outputs import RequestOutput, StreamDelta
from backend.core.sampling import PromptLogprobs, SampleOutput, TopLogprobs
from backend.core.scheduler import Scheduler
from backend.core.sequence import Sequence
from backend.core.stop import StopMatcher

logger = logging.getLogger(__name__)

OUTBOX_SIZE = 10_000  # finished add_request() outputs kept for take_finished() (oldest dropped beyond)

Sink = Callable[[StreamDelta], None]  # called on the thread that publishes; must not block


@dataclass
class Request:
    seq: Sequence
    prompt: str | None
    emitted_text: int = 0  # characters of seq.text already streamed
    emitted_tokens: int = 0
    sink: Sink | None = None  # where its deltas are pushed (a stream's queue, the server's event loop)
    done: threading.Event = field(default_factory=threading.Event)
    prompt_logprobs: list[float | None] | None = None  # filled as the prefill advances
    prompt_top_logprobs: list[TopLogprobs | None] | None = None
    detokenizer: Detokenizer | None = None  # seq.text, one new token at a time (None: no tokenizer)
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    final: RequestOutput | None = None  # set when it finishes
    manual: bool = False  # added by add_request(): its caller reads step() or take_finished()

    def store_prompt_logprobs(self, scored: PromptLogprobs) -> None:
        end = scored.start + len(scored.logprobs)
        self.prompt_logprobs[scored.start : end] = scored.logprobs
        if self.prompt_top_logprobs is not None:
            self.prompt_top_logprobs[scored.start : end] = scored.top_logprobs


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class RequestBook:
    """Requests by id, finish counters, and the outbox of add_request() outputs no caller received."""

    def __init__(self, scheduler: Scheduler, eos_token_ids: set[int] | frozenset[int], max_model_len: int) -> None:
        self.scheduler = scheduler
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.requests: dict[int, Request] = {}
        self.finished: Counter[str] = Counter()  # finished requests by reason (cumulative)
        self.outbox: deque[RequestOutput] = deque(maxlen=OUTBOX_SIZE)
        self.pending: list[tuple[Request, StreamDelta]] = []  # published, not yet pushed to their consumers

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, req: Request) -> None:
        self.requests[req.seq.seq_id] = req
        self.scheduler.add(req.seq)

    def abort(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is None or req.seq.is_finished:
            return
        self.scheduler.finish(req.seq, "abort")
        self.publish(req, None)

    def append_token(self, seq: Sequence, token: int, out: SampleOutput, row: int, now: float) -> None:
        """One sampled token: text, then the stop rules (eos, stop ids, stop strings, length) in that order."""
        seq.output_token_ids.append(token)
        if out.logprobs is not None and seq.params.logprobs is not None:
            seq.output_logprobs.append(out.logprobs[row])
            seq.output_top_logprobs.append(out.top_logprobs[row])
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        req = self.requests[seq.seq_id]
        if req.detokenizer is not None:
            seq.text = req.detokenizer.add(seq.output_token_ids)
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif req.stops.found(seq.text):
            reason = "stop"
        if reason is None and (len(seq.output_token_ids) >= p.max_new_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if req.detokenizer is not None:
                text = req.detokenizer.finish(seq.output_token_ids)  # exact: one full decode
                cut = req.stops.first(text)
                seq.text = text if cut is None else text[:cut]
            self.scheduler.finish(seq, reason)

    def publish(self, req: Request, stats: StepStats | None, to_outbox: bool = False) -> StreamDelta:
        """Build the delta since the last publish, to be pushed to the request's sink by `deliver`. A finished request
        is dropped here: its final output travels in the delta (and into the outbox when `to_outbox` and nobody
        called the step that finished it)."""
        seq = req.seq
        finished = seq.is_finished
        text = seq.text
        if not finished:  # hold back what may be a partial stop string or a partial character
            end = len(text) - req.stops.hold
            while end > req.emitted_text and text[end - 1] == "\ufffd":
                end -= 1
            text = text[: max(end, req.emitted_text)]
        output = self.output(req, text)
        delta = StreamDelta(
            seq.seq_id,
            text[req.emitted_text :],
            seq.output_token_ids[req.emitted_tokens :],
            finished,
            seq.finish_reason,
            output,
            stats,
        )
        req.emitted_text, req.emitted_tokens = len(text), len(seq.output_token_ids)
        if finished:
            req.final = output
            self.finished[seq.finish_reason] += 1
            self.requests.pop(seq.seq_id, None)
            if req.manual and to_outbox:
                self.outbox.append(output)  # nobody called this step: keep it for take_finished()
        self.pending.append((req, delta))
        return delta

    def deliver(self) -> bool:
        """Push the deltas published since the last call to their sinks, in order, then wake the waiters of the
        finished ones. A sink that raises fails its request (whose error delta goes to the same sink once more);
        never raises. Returns whether a sink failed (the state changed: that request finished)."""
        sink_failed = False
        while self.pending:
            batch, self.pending = self.pending, []
            for req, delta in batch:
                try:
                    if req.sink is not None:
                        req.sink(delta)
                except Exception as e:
                    logger.warning("request %d: its consumer failed: %s", req.seq.seq_id, error_text(e))
                    if not delta.finished:
                        sink_failed = True
                        self.fail([req.seq], error_text(e))
                if delta.finished:
                    req.done.set()
        return sink_failed

    @staticmethod
    def output(req: Request, text: str | None = None) -> RequestOutput:
        seq = req.seq
        want_lp = seq.params.logprobs is not None
        return RequestOutput(
            request_id=seq.seq_id,
            prompt=req.prompt,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=seq.text if text is None else text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if want_lp else None,
            top_logprobs=list(seq.output_top_logprobs) if want_lp else None,
            prompt_logprobs=None if req.prompt_logprobs is None else list(req.prompt_logprobs),
            prompt_top_logprobs=None if req.prompt_top_logprobs is None else list(req.prompt_top_logprobs),
            num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions,
            ttft=seq.ttft,
            latency=None if seq.finish_time is None else seq.finish_time - seq.arrival_time,
            error=seq.error,
        )

    def guarded(self, failed: dict[int, StreamDelta], seq: Sequence, to_outbox: bool, fn, *args):
        """`fn(*args)`, one request's own work; an exception fails that request alone (its final delta goes into
        `failed`, and None is returned)."""
        try:
            return fn(*args)
        except Exception as e:
            logger.warning("request %d failed: %s", seq.seq_id, error_text(e))
            failed.update((d.request_id, d) for d in self.fail([seq], error_text(e), to_outbox))
            return None

    def fail(self, seqs: list[Sequence], message: str, to_outbox: bool = False) -> list[StreamDelta]:
        """Fail these requests (freeing their blocks; one that finished but whose output could not be handed over
        ends as an error too); never raises, so a broken step cannot wedge them."""
        deltas = []
        for seq in list(seqs):
            req = self.requests.get(seq.seq_id)
            if req is None:
                continue
            seq.error = seq.error or message
            try:
                if seq.is_finished:
                    seq.finish_reason = "error"
                else:
                    self.scheduler.finish(seq, "error")
                deltas.append(self.publish(req, None, to_outbox))
            except Exception:  # last resort: drop it and wake its waiters
                logger.exception("could not fail request %d cleanly", seq.seq_id)
                self.requests.pop(seq.seq_id, None)
                req.final = req.final or self.output(req)
                req.done.set()
                if req.sink is not None:
                    req.sink(StreamDelta(seq.seq_id, "", [], True, "error", req.final))
        return deltas
