"""Prompts of API requests -> token ids: completion prompts (text or ids) and chat messages (chat template, with
their images for an image-text model).

The checks are the engine's own (`Engine.check_prompt_text`, `Engine.check_prompt_ids`: what add_request would
refuse), turned into 400s naming the API parameter; the server adds only what is the API's: the chat template,
the byte cap before tokenizing (backend/server/prompt_size.py), and OpenAI's context-length wording. Everything
here runs off the event loop (the routes call it through asyncio.to_thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from backend.core.errors import ContextLengthError, RequestError
from backend.multimodal.chat import NoChatTemplateError, NoImagesError, apply_template, encode_chat, read_messages
from backend.multimodal.inputs import expand_prompt
from backend.server.errors import APIError, bad_request
from backend.server.images import load_request_images
from backend.server.params import context_error
from backend.server.prompt_size import text_bytes
from backend.server.protocol import ChatMessage


def load_chat_template(template: str | None) -> str | None:
    """`--chat-template`: a file holding a Jinja template, or the template itself."""
    if template is None:
        return None
    path = Path(template)
    try:
        if len(template) < 4096 and path.is_file():
            return path.read_text()
    except OSError:
        pass
    if "{" not in template:
        raise ValueError(f"--chat-template {template!r} is neither a file nor a Jinja template")
    return template


def _refused(error: RequestError, param: str) -> APIError:
    if isinstance(error, ContextLengthError):
        return context_error(error.prompt_tokens, error.max_model_len, param=param)
    return bad_request(f"{param}: {error}", param, "invalid_value")


def check_text(engine, text: str, param: str) -> None:
    """The engine's checks of a text prompt (a 400 naming `param`)."""
    try:
        engine.check_prompt_text(text)
    except RequestError as e:
        raise _refused(e, param) from None


def check_ids(engine, ids: list[int], param: str = "prompt") -> list[int]:
    """The engine's checks of prompt token ids (a 400 naming `param`; too long: OpenAI's context message)."""
    try:
        return engine.check_prompt_ids(list(ids))
    except RequestError as e:
        raise _refused(e, param) from None


def check_bytes(state, engine, texts: list[str], param: str) -> None:
    """Refuse, before tokenizing, text whose bytes cannot fit the token cap (backend/server/prompt_size.py)."""
    state.check_prompt_bytes(engine, sum(text_bytes(t) for t in texts), param)


def encode_text(state, engine, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
    check_text(engine, text, param)
    check_bytes(state, engine, [text], param)
    return list(engine.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def completion_prompts(state, engine, prompt) -> list[tuple[str | None, list[int]]]:
    """-> [(text or None, ids)] for a string, a list of strings, a list of ids, or a list of id lists; each
    checked by the engine."""
    if isinstance(prompt, str):
        return [(prompt, check_ids(engine, encode_text(state, engine, prompt)))]
    if not prompt:
        raise bad_request("prompt is empty: give a string, a list of strings or token ids", "prompt", "invalid_value")
    if all(isinstance(p, str) for p in prompt):
        for p in prompt:  # every one before any is tokenized (the cap is per prompt)
            check_bytes(state, engine, [p], "prompt")
        return [(p, check_ids(engine, encode_text(state, engine, p))) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [(None, check_ids(engine, prompt))]
    return [(None, check_ids(engine, p)) for p in prompt]


def _request_error(error: RequestError) -> APIError:
    code = "unsupported_content" if isinstance(error, NoImagesError) else "invalid_value"
    if isinstance(error, NoChatTemplateError):
        code = "no_chat_template"
    return bad_request(str(error), error.param or "messages", code)


@dataclass
class ChatInput:
    """A chat request's prompt: its text, its token ids (image placeholders expanded) and its decoded images."""

    text: str
    ids: list[int]
    images: list = field(default_factory=list)


def chat_input(
    state,
    engine,
    messages: list[ChatMessage],
    template: str | None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
) -> ChatInput:
    """The messages through the chat template (backend/multimodal/chat.py, the Python API's path), their images
    under the host's limits (backend/server/images.py), each checked by the engine. 400 naming the field: no
    template or one that fails, too many bytes for the token cap, a bad image, a prompt the context cannot hold."""
    processor = engine.processor
    dicts = [m.model_dump(exclude_none=True) for m in messages]
    try:
        conversation = read_messages(dicts, takes_images=processor is not None)
    except RequestError as e:
        raise _request_error(e) from None
    check_bytes(state, engine, conversation.texts, "messages")
    try:
        text = apply_template(
            conversation, engine.tokenizer, processor, template, add_generation_prompt, template_kwargs
        )
    except RequestError as e:
        raise _request_error(e) from None
    check_text(engine, text, "messages")
    images = load_request_images(conversation.images, state.policy)
    if not images:
        return ChatInput(text, check_ids(engine, encode_chat(engine.tokenizer, text), "messages"))
    try:  # the ids the engine will run (the engine's processor call, run here to count and check them)
        ids = expand_prompt(processor, text, images)["input_ids"][0].tolist()
    except RequestError as e:
        raise bad_request(str(e), "messages", "invalid_image") from None
    return ChatInput(text, check_ids(engine, ids, "messages"), images)
