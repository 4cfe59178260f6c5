"""What callers ask of a running engine, as messages: the engine's inbox holds them until the state they change is
free (at once between steps, else at the end of the step in progress), and they are applied in order there."""

from __future__ import annotations

from dataclasses import dataclass

from backend.core.requests import Request, RequestBook


@dataclass(frozen=True)
class AddRequest:
    request: Request

    def apply(self, book: RequestBook) -> None:
        book.add(self.request)


@dataclass(frozen=True)
class AbortRequest:
    request_id: int

    def apply(self, book: RequestBook) -> None:
        book.abort(self.request_id)


@dataclass(frozen=True)
class ResetPrefixCache:
    def apply(self, book: RequestBook) -> None:
        book.scheduler.allocator.reset_prefix_cache()


Message = AddRequest | AbortRequest | ResetPrefixCache
