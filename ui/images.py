"""Images in the app's requests: the upload's check (every door that takes an image runs it), what the loaded model
takes, the prompt text with the model's image placeholder, and one image request prefilled for the Inside tab.

The engine does the rest (backend/multimodal): its `images=` keyword decodes, checks and hashes the image, the
processor expands the placeholder into the image's tokens, and the vision tower runs once per request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from backend.core.errors import RequestError
from backend.models import vlm

MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # an uploaded image file larger than this is refused before it is decoded
MAX_UPLOAD_PIXELS = 4096 * 4096  # and a decoded one with more pixels than this
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "sample_image.png"  # 96x96, drawn, 479 bytes
UPLOAD_INFO = f"PNG, JPEG, WebP, ...: at most {MAX_UPLOAD_BYTES // 2**20} MB and {MAX_UPLOAD_PIXELS:,} pixels"
FIELD = "image"


def upload_path(value) -> str | None:
    """The file path of what an image input gave (a path, Gradio's file dict / FileData); None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        value = value.get("path")
    elif hasattr(value, "path") and not isinstance(value, (str, os.PathLike)):
        value = value.path
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise RequestError(f"{FIELD}: expected an uploaded image file, got {type(value).__name__}", param=FIELD)
    return str(value)


def checked_image(value):
    """The RGB PIL image of an upload, or None when there is none. RequestError (param `image`) for a file too large,
    one that does not decode (the engine's own decoding, backend/multimodal/images.py), or too many pixels."""
    from backend.multimodal.images import load_image

    path = upload_path(value)
    if path is None:
        return None
    try:
        size = os.stat(path).st_size
    except OSError:
        raise RequestError(f"{FIELD}: the uploaded file is gone; upload it again", param=FIELD) from None
    if size > MAX_UPLOAD_BYTES:
        raise RequestError(
            f"{FIELD}: the file is {size / 2**20:.1f} MB; at most {MAX_UPLOAD_BYTES // 2**20} MB here", param=FIELD
        )
    try:
        image = load_image(path, FIELD)
    except RequestError as e:
        raise RequestError(str(e).replace(path, Path(path).name), param=FIELD) from None  # no server paths shown
    if image.width * image.height > MAX_UPLOAD_PIXELS:
        raise RequestError(
            f"{FIELD}: {image.width}x{image.height} pixels; at most {MAX_UPLOAD_PIXELS:,} here", param=FIELD
        )
    return image


def sample_image():
    """The bundled sample image (examples/sample_image.png), decoded."""
    return checked_image(str(SAMPLE_IMAGE))


def sample_copy(folder: str | Path) -> Path:
    """The sample image copied into `folder`/flab-sample/ (once; again when the copy differs)."""
    target = Path(folder) / "flab-sample" / SAMPLE_IMAGE.name
    data = SAMPLE_IMAGE.read_bytes()
    if not target.is_file() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return target


def image_refusal(engine) -> str | None:
    """Why the loaded engine takes no images (one line), or None when it does."""
    if engine is None:
        return "no model is loaded"
    info = engine.describe().get("images")
    if info is None:
        return "the loaded model is a language model: it takes text only (pick an image-text model, e.g. tiny:llava)"
    if not info.get("accepted"):
        return f"the loaded model cannot take images here: {info.get('reason')}"
    return None


def require_images(engine) -> None:
    """RequestError (param `image`) when the loaded model takes no images."""
    why = image_refusal(engine)
    if why is not None:
        raise RequestError(f"{FIELD}: {why}; remove the image", param=FIELD)


def image_prompt(engine, text: str, use_chat_template: bool) -> str:
    """The prompt text of an image request for the loaded model (backend/models/vlm.image_prompt: its chat template
    over an image part and `text`, else its placeholder before `text`)."""
    return vlm.image_prompt(engine.processor, text, use_chat_template)


def image_token_id(engine) -> int | None:
    """The id of the placeholder token that image features replace."""
    model_id = getattr(engine.model, "image_token_id", None)
    if model_id is not None:
        return int(model_id)
    proc_id = getattr(engine.processor, "image_token_id", None)
    return None if proc_id is None else int(proc_id)


@dataclass
class ImagePrefill:
    """One image request, stopped right after its prompt was prefilled (its blocks still held)."""

    prompt_token_ids: list[int]
    tokens: list[str]  # each prompt token decoded on its own
    image_mask: list[bool]  # True where the token is an image placeholder
    kv_view: list  # Engine.kv_cache_view() after the prefill
    steps: list = field(default_factory=list)  # StepStats of the steps that prefilled it
    request_id: int = -1
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


def prefill_image_request(engine, prompt: str, image, owner: str | None = None, max_steps: int = 256) -> ImagePrefill:
    """Add one image request and step the engine until its prompt is prefilled (its first token sampled), with the
    background loop held off (`exclusive_steps`); take the KV view while its blocks are held, then abort it.
    Requests of other users that share these steps run as usual."""
    from backend import SamplingParams

    params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    since = engine.stats().num_steps - 1
    first = None
    with engine.exclusive_steps():
        rid = engine.add_request(prompt, params, owner=owner, images=[image])
        try:
            for _ in range(max_steps):
                first = next((d for d in engine.step() if d.request_id == rid), None)
                if first is not None:
                    break
            if first is None or first.output.error:
                why = first.output.error if first is not None else f"not prefilled after {max_steps} steps"
                raise RequestError(f"the image request failed: {why}", param=FIELD)
            view = engine.kv_cache_view()  # its blocks are held: it still has a token to sample
        finally:
            engine.abort(rid)  # applied at once: no step is in flight while we hold the steps
    out = first.output
    ids = list(out.prompt_token_ids)
    image_id = image_token_id(engine)
    steps = engine.step_history(since)
    decode = engine.tokenizer.decode
    return ImagePrefill(
        ids, [decode([i]) for i in ids], [i == image_id for i in ids], view, steps, rid, out.num_cached_tokens
    )


def image_requests(engine, prompts: list[str], use_chat_template: bool, image) -> tuple[list[str], list[int]]:
    """(prompt texts with the image placeholder, prompt token counts after the processor expanded it) of image
    requests, one `image` each. RequestError (param `image`): a model that takes no images, a prompt the processor
    refuses (the engine checks each request again when it is sent)."""
    require_images(engine)
    texts = [image_prompt(engine, p, use_chat_template) for p in prompts]
    lens: dict[str, int] = {}
    for text in set(texts):
        try:
            ids = engine.processor(text=[text], images=[image], return_tensors="pt")["input_ids"]  # (1, L)
        except (ValueError, TypeError, IndexError) as e:
            raise RequestError(f"{FIELD}: the processor refused the prompt with the image: {str(e)[:300]}", param=FIELD)
        lens[text] = int(ids.shape[-1])
    return texts, [lens[t] for t in texts]


def refuse_endpoint_image(image) -> None:
    """An image with an endpoint target: refused (the endpoint gets text prompts through /v1/completions)."""
    if image is not None:
        raise RequestError(
            f"{FIELD}: images go to this app's engine only; an endpoint gets text prompts (remove the image or the "
            "endpoint URL)",
            param=FIELD,
        )
