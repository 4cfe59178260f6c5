"""The host's policy on one API request (backend/hosting): who the visitor is, the caps (400), the visitor's
parallel sequences (429; 400 for a request over the cap by itself), and a streamed response that gives the
visitor's slots back when it ends.

The visitor is the client's address; off a hosted server (a loopback address, --not-hosted) the request's `user`,
when given, is the visitor instead, so local tools can tell their clients apart. Hosted, `user` is not trusted
(a client could pick a new one per request to dodge the cap). The visitor is also the engine owner: the
scheduler shares each step fairly across owners and caps one owner's running sequences.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import StreamingResponse

import backend.server.sse as sse
from backend.hosting import HostingError, HostPolicy, VisitorLimiter, check_request, clamp_request
from backend.server.errors import APIError


def visitor_id(request: Request | None, user: str | None, policy: HostPolicy) -> str:
    host = request.client.host if request is not None and request.client is not None else "unknown"
    if user and not policy.hosted:
        return f"user:{user}"
    return f"client:{host}"


def check_caps(policy: HostPolicy, max_new_tokens: int | None, prompt_lens: list[int], param: str, prompt_param: str):
    """The host's caps on output and prompt tokens -> a 400 naming the parameter."""
    try:
        check_request(policy, max_new_tokens=max_new_tokens)
    except HostingError as e:
        raise APIError(400, str(e), param, "invalid_value") from None
    for n in prompt_lens:
        try:
            check_request(policy, prompt_tokens=n)
        except HostingError as e:
            raise APIError(400, str(e), prompt_param, "context_length_exceeded") from None


def check_parallel_cap(policy: HostPolicy, sequences: int) -> None:
    """A request that runs more sequences at once than the host lets one visitor run can never be served: a 400
    naming `n` (a 429 would tell clients to retry it forever)."""
    cap = policy.max_parallel_per_visitor
    if cap is not None and sequences > cap:
        raise APIError(
            400,
            f"n: this request runs {sequences} sequences at once (prompts x n) and this host allows at most {cap} "
            f"per visitor: ask for at most {cap}",
            "n",
            "invalid_value",
        )


def default_length(policy: HostPolicy, default: int) -> int:
    """The output length used when the request sets none: the server's default, cut to the host's cap."""
    return clamp_request(policy, None, default)


class Lease:
    """`sequences` of `visitor`'s parallel slots, held until `release()` (idempotent)."""

    def __init__(self, visitors: VisitorLimiter, visitor: str, sequences: int) -> None:
        try:
            visitors.acquire(visitor, sequences)
        except HostingError as e:
            raise APIError(429, str(e), None, "rate_limit_exceeded") from None
        self._visitors, self.visitor, self.sequences = visitors, visitor, sequences
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._visitors.release(self.visitor, self.sequences)


class HeldStreamingResponse(StreamingResponse):
    """A streamed answer that releases its lease when the response ends, however it ends (finished, the client
    gone before the first chunk or during the stream, an error)."""

    def __init__(self, content, lease: Lease, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.lease = lease

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()


async def answer(job, sequences: int, stream: bool, request: Request):
    """A completions or chat job's response while `sequences` of its visitor's parallel slots are held (429 over
    the cap): the SSE stream of `job.events()`, released when the response ends however it ends, or the whole
    answer of `job.respond(request)`, released once it is built. A request over the cap by itself: a 400."""
    check_parallel_cap(job.state.policy, sequences)
    lease = Lease(job.state.visitors, job.visitor, sequences)
    if stream:
        return HeldStreamingResponse(job.events(), lease, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    try:
        return await job.respond(request)
    finally:
        lease.release()
