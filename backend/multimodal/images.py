"""One image of a request, from what a caller may give: a PIL image, a file path, or the file's bytes."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from backend.core.errors import RequestError

MAX_IMAGE_PIXELS = 50_000_000  # a decoded image larger than this is refused (a decompression bomb)


def load_image(value: object, field: str) -> Image.Image:
    """The RGB image of `value` (PIL image, path or bytes); a RequestError naming `field` otherwise."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(bytes(value)), field, "bytes")
    elif isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise RequestError(f"{field}: no image file at {str(path)[:200]!r}")
        image = _open(path, field, str(path)[:200])
    else:
        kind = type(value).__name__
        raise RequestError(f"{field} must be a PIL image, a file path or the image file's bytes, got {kind}")
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise RequestError(f"{field}: {image.width}x{image.height} pixels; at most {MAX_IMAGE_PIXELS} are allowed")
    return image.convert("RGB")


def _open(source, field: str, what: str) -> Image.Image:
    try:
        image = Image.open(source)
        image.load()  # decode now: a truncated file fails here, not in the processor
        return image
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{field}: cannot decode the image ({what}): {type(e).__name__}: {e}") from None


def pixels_hash(tensors: dict[str, torch.Tensor]) -> int:
    """A hash of the processed pixels (and their shapes): joins the KV block hashes of the request."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.reshape(-1)
        h.update((flat if t.dtype == torch.bool else flat.view(torch.uint8)).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")
