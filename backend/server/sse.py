"""Server-sent events as OpenAI streams them: `data: <json>` blocks, an error event, then `data: [DONE]`."""

from __future__ import annotations

import json

from pydantic import BaseModel

from backend.server.errors import APIError

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(body: BaseModel | dict) -> str:
    data = body.model_dump_json(exclude_none=False) if isinstance(body, BaseModel) else json.dumps(body)
    return f"data: {data}\n\n"


def error_event(error: APIError) -> str:
    return event(error.body())
