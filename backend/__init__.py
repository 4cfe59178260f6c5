"""Fallback Lab's inference engine."""

from backend.config import EngineConfig
from backend.engine import Engine, RequestStream
from backend.outputs import RequestOutput, StreamDelta
from backend.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "RequestStream", "SamplingParams", "StreamDelta"]
