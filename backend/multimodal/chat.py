"""Chat messages (OpenAI style) -> the prompt the chat template makes, and the images in prompt order.

The one path of the Python API (`Engine.chat_prompt` / `Engine.chat`) and of the server's /v1/chat/completions
(backend/server/prompts.py): the messages are read here (`read_messages`), the faces decide where image bytes come
from (the Python API: `load_image`; the server: data: URLs and allowed domains under the host's limits), and the
template is applied here (`apply_template`): the processor's for an image-text model, the tokenizer's otherwise.

A message's `content` is a string or a list of parts:
    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   (OpenAI; the url may be a string)
    {"type": "image", "image": <PIL image | path | bytes | data: URL>}         (transformers' chat format; also
                                                                                "url" or "path" for "image")
Errors are RequestErrors whose param names the field (`messages[0].content[1].image_url`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from backend.core.errors import RequestError
from backend.multimodal.images import load_image

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = ("name", "tool_call_id")  # passed to the template when given
RESERVED_KWARGS = ("conversation", "chat_template", "tokenize", "add_generation_prompt", "return_dict", "tools")


class NoImagesError(RequestError):
    """An image part for a model that takes no images (a language model, or an image-text model whose processor
    cannot load here)."""


class NoChatTemplateError(RequestError):
    """The model has no chat template and none was given."""


@dataclass
class ImagePart:
    """One image of the messages: where it comes from and the field that names it in errors."""

    source: object  # a PIL image, a path, bytes, or a URL (data: or http(s)) string
    field: str  # e.g. "messages[0].content[1].image_url"


@dataclass
class Conversation:
    """Messages read: for the template (content a string, or parts {"type": "text"} / {"type": "image"}), their
    texts (for the byte cap) and their images in prompt order."""

    messages: list[dict]
    texts: list[str]
    images: list[ImagePart] = field(default_factory=list)


@dataclass
class ChatPrompt:
    """What the chat template made of the messages, ready for generate / stream / open_stream / add_request."""

    text: str  # the prompt text (the image placeholders as the template writes them)
    images: list  # decoded images (PIL, RGB) in prompt order; empty: a text-only prompt
    token_ids: list[int] | None  # a text-only prompt's ids (the template wrote its special tokens); None with images

    def request_kwargs(self) -> dict:
        """engine.stream(**prompt.request_kwargs(), params=...): the prompt's ids, or its text and images."""
        if self.images:
            return dict(prompt=self.text, images=list(self.images))
        return dict(prompt_token_ids=list(self.token_ids))


def _get(message, key: str):
    return message.get(key) if isinstance(message, dict) else getattr(message, key, None)


def _image_source(part: dict, kind: str, where: str) -> ImagePart:
    """The image of an "image_url" or "image" part."""
    if kind == "image_url":
        value = part.get("image_url")
        if isinstance(value, dict):
            value = value.get("url")
        where = f"{where}.image_url"
        if not isinstance(value, str) or not value:
            raise RequestError(
                f"{where} must be {{'url': 'data:image/...;base64,...'}} (or an http(s) URL where the host allows "
                "its domain)",
                param=where,
            )
        return ImagePart(value, where)
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return ImagePart(part[key], f"{where}.{key}")
    raise RequestError(f"{where}: an image part needs 'image' (a PIL image, path, bytes or data: URL)", param=where)


def read_messages(messages: object, takes_images: bool) -> Conversation:
    """Check OpenAI-style messages (dicts, or objects with the same attributes) and split their parts.

    `takes_images`: whether the model can take images here; when not, an image part is refused naming it, and
    each message's text parts are joined into one string (as a language model's template expects)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages must be a non-empty list of {'role', 'content'} messages", param="messages")
    conversation: list[dict] = []
    texts: list[str] = []
    images: list[ImagePart] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role, content = _get(m, "role"), _get(m, "content")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r:.40}", f"{where}.role")
        if content is None or isinstance(content, str):  # a processor's template reads parts
            parts = [{"type": "text", "text": content or ""}]
            entry = {"role": role, "content": parts if takes_images else content or ""}
            texts.append(content or "")
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise RequestError(f"{at}.text must be a string", param=f"{at}.text")
                    parts.append({"type": "text", "text": part["text"]})
                    texts.append(part["text"])
                elif kind in ("image_url", "image"):
                    image = _image_source(part, kind, at)
                    if not takes_images:
                        raise NoImagesError(
                            f"{image.field}: this model takes no images (a language model, or its processor cannot "
                            "load here); send text parts only",
                            param=image.field,
                        )
                    images.append(image)
                    parts.append({"type": "image"})
                else:
                    raise RequestError(
                        f"{at}: a content part must be {{'type': 'text'}}, {{'type': 'image_url'}} or "
                        f"{{'type': 'image'}}, got type {kind!r:.40}",
                        param=f"{at}.type",
                    )
            text_only = "".join(p["text"] for p in parts if p["type"] == "text")
            entry = {"role": role, "content": parts if takes_images else text_only}
        else:
            raise RequestError(
                f"{where}.content must be a string or a list of parts, got {type(content).__name__}", f"{where}.content"
            )
        for key in MESSAGE_KEYS:
            if _get(m, key) is not None:
                entry[key] = _get(m, key)
        conversation.append(entry)
    return Conversation(conversation, texts, images)


def apply_template(
    conversation: Conversation,
    tokenizer,
    processor=None,
    template: str | None = None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
) -> str:
    """The prompt text: the processor's chat template when the model takes images (`processor`, an HF processor),
    else the tokenizer's; `template` replaces the model's. RequestError (param "messages") when there is none or it
    fails on these messages."""
    if tokenizer is None:
        raise RequestError("this model was loaded without a tokenizer: chat needs one", param="messages")
    owner = processor if processor is not None else tokenizer
    template = template or getattr(owner, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not template:
        raise NoChatTemplateError(
            "this model has no chat template: give one (the server's --chat-template), or send a plain prompt",
            param="messages",
        )
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if isinstance(k, str) and k.isidentifier()}
    for reserved in RESERVED_KWARGS:
        kwargs.pop(reserved, None)
    try:
        text = owner.apply_chat_template(
            conversation.messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except Exception as e:  # a template that raises (e.g. "roles must alternate") is the request's problem
        raise RequestError(
            f"the chat template failed on these messages: {type(e).__name__}: {str(e)[:300]}", param="messages"
        ) from None
    if isinstance(text, list) and len(text) == 1:  # a processor may answer a batch of one
        text = text[0]
    if not isinstance(text, str) or not text:
        raise RequestError("the chat template did not produce a prompt text", param="messages")
    return text


def encode_chat(tokenizer, text: str) -> list[int]:
    """A rendered text-only chat prompt -> ids (the template writes the special tokens itself, as transformers
    does)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt(
    tokenizer,
    processor,
    messages: object,
    template: str | None = None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
    load: Callable[[object, str], object] = load_image,
) -> ChatPrompt:
    """The Python API's chat prompt: `processor` the HF processor (None for a language model, or one whose processor
    cannot load here); images decoded with `load(source, field)`."""
    conversation = read_messages(messages, takes_images=processor is not None)
    images = [load(part.source, part.field) for part in conversation.images]
    text = apply_template(conversation, tokenizer, processor, template, add_generation_prompt, template_kwargs)
    return ChatPrompt(text, images, None if images else encode_chat(tokenizer, text))
