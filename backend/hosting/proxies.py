"""Whose address a request has: the connection's, or, when it comes through a proxy the host trusts, the client
address that proxy recorded in X-Forwarded-For. The API tells its clients apart by that address (a visitor's
parallel-sequence cap, the engine's fair share), so behind a proxy it must be read through the proxy, and only
through proxies the host names: anyone can write an X-Forwarded-For header.

The host names its proxies (`--forwarded-allow-ips`, FLAB_FORWARDED_ALLOW_IPS, or uvicorn's own
FORWARDED_ALLOW_IPS): addresses or networks (10.0.0.0/8, 127.0.0.1 for a proxy on this machine); by default none
is trusted, loopback included: any local process (another user's, a tunnel, a browser extension's helper) can
reach 127.0.0.1, so trusting it by default let anyone who reached the port through a local forwarder pick a new
address per request. uvicorn's ProxyHeadersMiddleware does the reading: from the right of the
X-Forwarded-For chain, the first address that is not a trusted proxy is the client. "*" trusts every peer and
so takes the chain's leftmost entry, which the client writes itself: a hosted server refuses it, since a client
could then pick a new address per request and dodge the caps.

A request that carries X-Forwarded-For from a peer the host does not trust is served by its connection's address
(the proxy's, shared by every client behind it): logged once per peer, with the flag that fixes it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from backend.hosting.errors import HostingError

logger = logging.getLogger(__name__)

DEFAULT_TRUSTED_PROXIES: tuple[str, ...] = ()  # none unless the host names them
TRUST_ALL = "*"


def check_trusted_proxies(entries: Iterable[str], hosted: bool) -> tuple[str, ...]:
    """The trusted proxies, each an address, a network or "*" -> a tuple; raises HostingError naming a bad entry,
    or "*" on a hosted server."""
    if isinstance(entries, str):
        raise HostingError("forwarded_allow_ips must be a sequence of addresses or networks, not one string")
    checked = []
    for entry in entries:
        text = str(entry).strip()
        if text == TRUST_ALL:
            if hosted:
                raise HostingError(
                    "--forwarded-allow-ips '*' trusts every peer's X-Forwarded-For, which any client writes itself: "
                    "on a hosted server a client could pick a new address per request and dodge the per-visitor "
                    "caps. Name the proxies' addresses or network instead (e.g. 10.0.0.0/8)"
                )
        else:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise HostingError(
                    f"--forwarded-allow-ips: {text!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8)"
                ) from None
        checked.append(text)
    return tuple(checked)


class ForwardedClientMiddleware:
    """ASGI: the client address through the trusted proxies (uvicorn's middleware), and a warning, once per peer,
    for X-Forwarded-For from a peer that is not trusted. Start uvicorn with proxy_headers=False: this is the rule."""

    def __init__(self, app, trusted: tuple[str, ...]) -> None:
        self.trusted = trusted
        self._proxy = ProxyHeadersMiddleware(app, trusted_hosts=list(trusted))
        self._warned: set[str] = set()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            self._warn_untrusted(scope)
        await self._proxy(scope, receive, send)

    def _warn_untrusted(self, scope) -> None:
        peer = (scope.get("client") or ("", 0))[0]
        if not peer or peer in self._warned or peer in self._proxy.trusted_hosts:
            return
        if any(name == b"x-forwarded-for" for name, _ in scope.get("headers", ())):
            self._warned.add(peer)
            logger.warning(
                "requests from %s carry X-Forwarded-For but that peer is not a trusted proxy (trusted: %s): every "
                "client behind it shares its address and its caps. If it is your proxy, start with "
                "--forwarded-allow-ips %s (or FLAB_FORWARDED_ALLOW_IPS)",
                peer,
                ", ".join(self.trusted) or "none",
                peer,
            )
