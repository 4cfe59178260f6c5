"""One image of a request, from what a caller may give: a PIL image, a file path, the file's bytes, or a `data:` URL
(base64). Sizes are checked before the pixels are decoded (a decompression bomb is refused from its header)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from backend.core.errors import RequestError

MAX_IMAGE_PIXELS = 50_000_000  # a decoded image larger than this is refused (a decompression bomb)
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
REMOTE_SCHEMES = ("http://", "https://")


def load_image(value: object, field: str, max_pixels: int | None = None, max_bytes: int | None = None) -> Image.Image:
    """The RGB image of `value` (PIL image, path, bytes or a `data:` URL); a RequestError naming `field` (its param)
    otherwise. `max_pixels` (default MAX_IMAGE_PIXELS) is checked from the header, before decoding; `max_bytes`
    bounds an encoded image's bytes (None: no bound)."""
    cap = MAX_IMAGE_PIXELS if max_pixels is None else min(max_pixels, MAX_IMAGE_PIXELS)
    if isinstance(value, Image.Image):
        check_pixels(value, field, cap)
        return value.convert("RGB")
    if isinstance(value, str) and value[:5].lower() == "data:":
        return decode_image(decode_data_url(value, field, max_bytes), field, "data: URL", cap)
    if isinstance(value, str) and value[:8].lower().startswith(REMOTE_SCHEMES):
        raise RequestError(
            f"{field}: a remote URL ({value[:100]!r}); the engine reads no URLs: download the image and give "
            "its bytes, a path or a data: URL (the server fetches URLs of the domains its host allows)",
            param=field,
        )
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        check_bytes(len(data), field, max_bytes)
        return decode_image(data, field, "bytes", cap)
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise RequestError(f"{field}: no image file at {str(path)[:200]!r}", param=field)
        check_bytes(path.stat().st_size, field, max_bytes)
        return decode_image(path.read_bytes(), field, str(path)[:200], cap)
    kind = type(value).__name__
    raise RequestError(
        f"{field} must be a PIL image, a file path, the image file's bytes or a data: URL, got {kind}", param=field
    )


def check_bytes(size: int, field: str, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise RequestError(f"{field}: the image is {size} bytes; at most {max_bytes} are allowed", param=field)


def check_pixels(image: Image.Image, field: str, cap: int) -> None:
    if image.width * image.height > cap:
        raise RequestError(
            f"{field}: {image.width}x{image.height} = {image.width * image.height} pixels; at most {cap} are allowed",
            param=field,
        )


def decode_data_url(url: str, field: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL; the size is checked before decoding."""
    match = DATA_URL.match(url)
    if match is None or not match["b64"]:
        raise RequestError(
            f"{field}: a data: URL must read data:image/<type>;base64,<data>, got {url[:40]!r}", param=field
        )
    mime = (match["mime"] or "").lower()
    if mime and not mime.startswith("image/"):
        raise RequestError(f"{field}: a data: URL of type {mime!r}; only image/* is accepted", param=field)
    payload = url[match.end() :]
    check_bytes(len(payload) * 3 // 4 - payload.count("=", -2), field, max_bytes)  # the decoded size, from the text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{field}: the data: URL's base64 cannot be decoded ({e})", param=field) from None


def decode_image(data: bytes, field: str, what: str, cap: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an encoded image: its size is read from the header and checked against `cap` before the pixels."""
    try:
        image = Image.open(io.BytesIO(data))
        check_pixels(image, field, cap)
        image.load()  # decode now: a truncated file fails here, not in the processor
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(
            f"{field}: cannot decode the image ({what}): {type(e).__name__}: {str(e)[:200]}", param=field
        ) from None


def pixels_hash(tensors: dict[str, torch.Tensor]) -> int:
    """A hash of the processed pixels (and their shapes): joins the KV block hashes of the request."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.reshape(-1)
        h.update((flat if t.dtype == torch.bool else flat.view(torch.uint8)).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")
