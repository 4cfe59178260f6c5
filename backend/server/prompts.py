"""Prompts of API requests -> token ids: completion prompts (text or ids) and chat messages (chat template).

The checks are the engine's own (`Engine.check_prompt_text`, `Engine.check_prompt_ids`: what add_request would
refuse), turned into 400s naming the API parameter; the server adds only what is the API's: the chat template,
the byte cap before tokenizing (backend/server/prompt_size.py), and OpenAI's context-length wording. Everything
here runs off the event loop (the routes call it through asyncio.to_thread).
"""

from __future__ import annotations

from pathlib import Path

from backend.core.errors import ContextLengthError, RequestError
from backend.server.errors import APIError, bad_request
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


def _content(message: ChatMessage, i: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type")
            raise bad_request(
                f"messages[{i}].content: only text parts are supported, got a part of type {kind!r:.40}",
                f"messages.{i}.content",
                "unsupported_content",
            )
        texts.append(part["text"])
    return "".join(texts)


def render_chat(
    state,
    engine,
    messages: list[ChatMessage],
    template: str | None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
) -> str:
    """The prompt text the chat template makes of `messages`. 400 when there is no template or it fails, when the
    messages are too many bytes for the token cap, or when the engine refuses the text."""
    if not messages:
        raise bad_request("messages is empty: give at least one message", "messages", "invalid_value")
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise bad_request("this model was loaded without a tokenizer: chat needs one", "messages")
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise bad_request(
            "this model has no chat template: start the server with --chat-template (a Jinja file or string), "
            "or use /v1/completions",
            "messages",
            "no_chat_template",
        )
    conversation = []
    for i, m in enumerate(messages):
        entry = {"role": m.role, "content": _content(m, i)}
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        conversation.append(entry)
    check_bytes(state, engine, [entry["content"] for entry in conversation], "messages")
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if isinstance(k, str) and k.isidentifier()}
    for reserved in ("conversation", "chat_template", "tokenize", "add_generation_prompt", "return_dict", "tools"):
        kwargs.pop(reserved, None)
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as e:  # a template that raises (e.g. "roles must alternate") is the request's problem
        raise bad_request(f"the chat template failed on these messages: {type(e).__name__}: {e}", "messages") from None
    if not isinstance(text, str):
        raise bad_request("the chat template did not produce a prompt text", "messages", "invalid_value")
    check_text(engine, text, "messages")
    return text


def encode_chat(engine, text: str) -> list[int]:
    """A rendered chat prompt -> ids (the template writes the special tokens itself, as transformers does)."""
    return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
