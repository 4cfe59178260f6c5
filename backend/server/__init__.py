"""The OpenAI-compatible HTTP server over one Engine (`python -m backend.launch_server`)."""

from backend.server.app import add_openai_routes, build_app
from backend.server.state import ServerLimits, ServerState

__all__ = ["ServerLimits", "ServerState", "add_openai_routes", "build_app"]
