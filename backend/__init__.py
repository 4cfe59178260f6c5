"""Fallback Lab's inference engine."""

from backend.config import EngineConfig
from backend.engine import Engine
from backend.outputs import RequestOutput, StreamDelta
from backend.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "RequestOutput", "SamplingParams", "StreamDelta"]
