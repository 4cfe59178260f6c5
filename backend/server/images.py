"""The images of a chat request (`image_url` / `image` content parts), under the host's limits (backend/hosting).

`data:` URLs (base64) are decoded here; an http(s) URL is fetched only from a domain the host allows
(`--allowed-image-domains`), and never from a private, loopback, link-local or reserved address: the host name is
resolved once, every address it resolves to must be public, and the connection goes to that checked address (a
second resolution cannot swap in another: DNS rebinding). The fetch has a timeout and a byte cap, and follows a
redirect only to the same host. Sizes are checked before decoding: bytes from the URL's length or the response's
header, pixels from the image's header (backend/multimodal/images.py). This runs off the event loop: the chat
route builds its job in a worker thread.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

from PIL import Image

from backend.core.errors import RequestError
from backend.hosting import HostingError, HostPolicy
from backend.hosting.limits import check_image_count
from backend.multimodal.chat import ImagePart
from backend.multimodal.images import MAX_IMAGE_PIXELS, decode_image, load_image
from backend.multimodal.inputs import MAX_IMAGES_PER_REQUEST
from backend.server.errors import APIError

FETCH_TIMEOUT_S = 10.0  # the whole fetch of one image URL: connect, redirects, body
FETCH_MAX_BYTES = 20 * 1024 * 1024  # an image URL's body when the host sets no --max-image-bytes
MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)


def image_error(message: str, field: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, field, code)


def load_request_images(parts: list[ImagePart], policy: HostPolicy) -> list[Image.Image]:
    """The decoded images of a request, in prompt order; a 400 naming the field, the value and what is allowed."""
    try:
        check_image_count(policy, len(parts))
    except HostingError as e:
        raise image_error(f"messages: {e}", parts[-1].field if parts else "messages", "too_many_images") from None
    if len(parts) > MAX_IMAGES_PER_REQUEST:
        raise image_error(
            f"messages: {len(parts)} images in one request; the engine takes at most {MAX_IMAGES_PER_REQUEST}",
            parts[-1].field,
            "too_many_images",
        )
    return [load_request_image(part, policy) for part in parts]


def load_request_image(part: ImagePart, policy: HostPolicy) -> Image.Image:
    source, field = part.source, part.field
    try:
        if isinstance(source, str) and source[:8].lower().startswith(("http://", "https://")):
            data = fetch_image(source, field, policy)
            cap = MAX_IMAGE_PIXELS if policy.max_image_pixels is None else policy.max_image_pixels
            return decode_image(data, field, f"from {urlsplit(source).hostname}", min(cap, MAX_IMAGE_PIXELS))
        if not isinstance(source, str) or source[:5].lower() != "data:":
            raise RequestError(
                f"{field}: the API takes data:image/...;base64 URLs (or http(s) URLs of the domains the host allows), "
                f"got {str(source)[:40]!r}",
                param=field,
            )
        return load_image(source, field, policy.max_image_pixels, policy.max_image_bytes)
    except RequestError as e:
        raise image_error(str(e), e.param or field) from None


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (tests replace this: no real network)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def blocked_reason(address: str) -> str | None:
    """Why an address must not be fetched from (private, loopback, link-local, reserved, ...), or None."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for what in ("loopback", "private", "link_local", "reserved", "multicast", "unspecified", "site_local"):
        if getattr(ip, f"is_{what}", False):
            return what.replace("_", "-")
    return None if ip.is_global else "not global"


def public_address(host: str, port: int, field: str) -> str:
    """The address to connect to: `host` resolved, refused unless every address is public."""
    try:
        addresses = resolve_host(host, port)
    except (OSError, UnicodeError) as e:
        raise RequestError(f"{field}: cannot resolve {host!r} ({e})", param=field) from None
    if not addresses:
        raise RequestError(f"{field}: {host!r} resolves to no address", param=field)
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None:
            raise RequestError(
                f"{field}: {host!r} resolves to {address}, a {reason} address; images are fetched from public "
                "addresses only",
                param=field,
            )
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address, with the URL's host in the Host header."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is verified for the URL's host."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        self.context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.context)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.context.wrap_socket(sock, server_hostname=self.host)


def http_get(scheme: str, host: str, address: str, port: int, target: str, timeout: float):
    """GET `target` from `host` at `address` -> (connection, response); tests replace this."""
    cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    conn = cls(host, address, port, timeout)
    conn.request("GET", target, headers={"User-Agent": "fallback-lab", "Accept": "image/*"})
    return conn, conn.getresponse()


def fetch_image(url: str, field: str, policy: HostPolicy) -> bytes:
    """The bytes at an http(s) URL of an allowed domain; RequestError naming `field` otherwise."""
    allowed = policy.allowed_image_domains
    if not allowed:
        raise RequestError(
            f"{field}: remote image URLs are not fetched on this server ({url[:100]!r}); send the image as a "
            "data:image/...;base64 URL (the host may allow named domains with --allowed-image-domains)",
            param=field,
        )
    cap = policy.max_image_bytes if policy.max_image_bytes is not None else FETCH_MAX_BYTES
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    if host not in allowed:
        raise RequestError(
            f"{field}: images are fetched only from {', '.join(allowed)}; {host or url[:100]!r} is not among them",
            param=field,
        )
    for _ in range(MAX_REDIRECTS + 1):
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise RequestError(f"{field}: the URL's port is not a number", param=field) from None
        address = public_address(host, port, field)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        left = deadline - time.monotonic()
        try:
            conn, response = http_get(parts.scheme, host, address, port, target, max(left, 0.1))
            try:
                if response.status in REDIRECTS:
                    location = urljoin(url, response.getheader("Location") or "")
                    nxt = urlsplit(location)
                    if nxt.scheme not in ("http", "https") or (nxt.hostname or "").lower().rstrip(".") != host:
                        raise RequestError(
                            f"{field}: {host} redirects to {location[:100]!r}; redirects to another host are not "
                            "followed",
                            param=field,
                        )
                    url, parts = location, nxt
                    continue
                if response.status != 200:
                    raise RequestError(f"{field}: {host} answered HTTP {response.status} for the image", param=field)
                return _read_capped(response, field, cap, deadline)
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as e:
            why = f"{type(e).__name__}: {e}"
            raise RequestError(f"{field}: fetching the image from {host} failed: {why}", param=field) from None
    raise RequestError(f"{field}: more than {MAX_REDIRECTS} redirects", param=field)


def _read_capped(response, field: str, cap: int, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise RequestError(f"{field}: the image is {int(length)} bytes; at most {cap} are allowed", param=field)
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise RequestError(f"{field}: fetching the image took over {FETCH_TIMEOUT_S:g} s", param=field)
        chunk = response.read(64 * 1024)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise RequestError(f"{field}: the image is over {cap} bytes; at most {cap} are allowed", param=field)
        chunks.append(chunk)
