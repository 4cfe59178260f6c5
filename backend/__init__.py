"""Fallback Lab's inference engine."""

from backend.core.config import EngineConfig
from backend.core.engine import Engine, RequestStream
from backend.core.outputs import RequestOutput, StreamDelta
from backend.core.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "RequestStream", "SamplingParams", "StreamDelta"]
