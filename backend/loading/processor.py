"""The processor of an image-text-to-text model (AutoProcessor): its tokenizer, its image processor, its chat template.

transformers builds and loads a processor that has a video part (Qwen2-VL, SmolVLM) only with torchvision installed,
even when no video is ever given. torchvision does not import beside this project's torch (docs/architecture.md),
so without it such a processor is loaded without its video part (`without_video`): the image and text paths do not
need it, and the engine takes no videos.
"""

from __future__ import annotations

import json
import logging
import types
from dataclasses import dataclass
from pathlib import Path

import transformers
from transformers import AutoProcessor, PretrainedConfig, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from backend.core.errors import UnsupportedModelError

logger = logging.getLogger(__name__)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class NoVideo:
    """Where a processor loaded without its video part reads video settings (SmolVLM's apply_chat_template reads
    num_frames and fps even for image-only messages): the engine takes no videos."""

    num_frames: int | None = None
    fps: float | None = None


def without_video(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of the processor class `cls` (same name) whose sub-processors leave out the video processor."""
    attributes = [a for a in cls.get_attributes() if "video" not in a]
    if len(attributes) == len(cls.get_attributes()):
        return cls
    namespace = {
        "get_attributes": classmethod(lambda _: list(attributes)),
        "__module__": cls.__module__,
        "video_processor": NoVideo(),
    }
    init = cls.__init__
    code = init.__code__
    positional = code.co_varnames[1 : code.co_argcount]  # without self
    defaults = init.__defaults__ or ()
    first_default = len(positional) - len(defaults)
    if "video_processor" in positional and positional.index("video_processor") < first_default:
        # a required argument of its own __init__ (SmolVLM): the same function with None as its default, so that
        # from_pretrained (which reads the code's argument names) and save_pretrained work as for the class itself
        missing = first_default - positional.index("video_processor")
        same = types.FunctionType(code, init.__globals__, init.__name__, (None,) * missing + defaults, init.__closure__)
        same.__kwdefaults__ = init.__kwdefaults__
        namespace["__init__"] = same
    return type(cls.__name__, (cls,), namespace)


def processor_class(path: Path, config: PretrainedConfig) -> type[ProcessorMixin] | None:
    """The processor class the folder names (processor_config.json), else the one of its model_type."""
    name = None
    file = path / "processor_config.json"
    if file.is_file():
        try:
            name = json.loads(file.read_text(encoding="utf-8")).get("processor_class")
        except (ValueError, UnicodeDecodeError, AttributeError):
            name = None
    name = name or PROCESSOR_MAPPING_NAMES.get(config.model_type)
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) and issubclass(cls, ProcessorMixin) else None


@dataclass(frozen=True)
class LoadedProcessor:
    processor: ProcessorMixin | None
    unavailable: str | None = None  # why there is none (image inputs are refused with it; text runs)


def load_processor(path: Path, config: PretrainedConfig, trust_remote_code: bool) -> LoadedProcessor:
    """The model's processor. A folder without processor files, or a processor that needs a package this environment
    cannot import (PixtralProcessor requires torchvision), leaves the model text-only, with the reason kept for the
    image requests it refuses; processor files that cannot be read are a clear error."""
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        return LoadedProcessor(None, f"the model folder has no processor files ({', '.join(PROCESSOR_FILES)})")
    cls = processor_class(path, config)
    try:
        if cls is not None and not is_torchvision_available():
            return LoadedProcessor(without_video(cls).from_pretrained(path))
        return LoadedProcessor(AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code))
    except ImportError as e:
        reason = " ".join(str(e).split())[:200]
        logger.warning("%s: no processor (%s): text-only requests", path, reason)
        return LoadedProcessor(None, f"its processor cannot be loaded here ({reason})")
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
        raise UnsupportedModelError(
            f"cannot load the processor of the image-text model in {path} ({type(e).__name__}: {str(e)[:300]}); an "
            "image-text model needs its processor files (preprocessor_config.json, processor_config.json and the "
            "tokenizer's): download them into the folder"
        ) from e
