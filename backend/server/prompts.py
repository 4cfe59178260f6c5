"""Prompts of API requests -> token ids: completion prompts (text or ids) and chat messages (chat template)."""

from __future__ import annotations

from pathlib import Path

from backend.server.errors import bad_request
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


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid Unicode (a lone surrogate at position {e.start})", param) from None


def encode_text(tokenizer, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
    if tokenizer is None:
        raise bad_request("this model was loaded without a tokenizer: send token ids", param)
    if not text:
        raise bad_request(f"{param} is empty: give a non-empty string", param, "invalid_value")
    _check_text(text, param)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> list[int]:
    if not ids:
        raise bad_request(f"{param} is empty (no tokens)", param, "invalid_value")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token ids must be in [0, {vocab_size}), got {bad}", param, "invalid_value")
    return list(ids)


def completion_prompts(prompt, tokenizer, vocab_size: int) -> list[tuple[str | None, list[int]]]:
    """-> [(text or None, ids)] for a string, a list of strings, a list of ids, or a list of id lists."""
    if isinstance(prompt, str):
        return [(prompt, encode_text(tokenizer, prompt))]
    if not prompt:
        raise bad_request("prompt is empty: give a string, a list of strings or token ids", "prompt", "invalid_value")
    if all(isinstance(p, str) for p in prompt):
        return [(p, encode_text(tokenizer, p)) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [(None, check_ids(prompt, vocab_size))]
    return [(None, check_ids(p, vocab_size)) for p in prompt]


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
    tokenizer,
    messages: list[ChatMessage],
    template: str | None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
) -> str:
    """The prompt text the chat template makes of `messages`. 400 when there is no template or it fails."""
    if not messages:
        raise bad_request("messages is empty: give at least one message", "messages", "invalid_value")
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
        text = _content(m, i)
        _check_text(text, f"messages.{i}.content")
        entry = {"role": m.role, "content": text}
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        conversation.append(entry)
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if isinstance(k, str) and k.isidentifier()}
    for reserved in ("conversation", "chat_template", "tokenize", "add_generation_prompt", "return_dict", "tools"):
        kwargs.pop(reserved, None)
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as e:  # a template that raises (e.g. "roles must alternate") is the request's problem
        raise bad_request(f"the chat template failed on these messages: {type(e).__name__}: {e}", "messages") from None
    if not isinstance(text, str) or not text:
        raise bad_request("the chat template produced an empty prompt", "messages", "invalid_value")
    return text


def encode_chat(tokenizer, text: str) -> list[int]:
    """A rendered chat prompt -> ids (the template writes the special tokens itself, as transformers does)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
