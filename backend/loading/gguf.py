"""GGUF as an import path: convert a GGUF file transformers can read into a safetensors checkpoint folder.

The engine never runs GGUF itself (hub_common.GGUF_MESSAGE). transformers' GGUF loader dequantizes the file
into an ordinary transformers model with its tokenizer and chat template; this module writes that model as a
safetensors checkpoint in the dtype asked for, without the `quantization_config` that marks it as GGUF and
with the `architectures` entry the loader leaves empty, so the folder loads like any Hub snapshot.

    python -m backend.tools.convert_gguf model.Q4_1.gguf ~/models/my-model --dtype bfloat16
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from backend.core.config import DTYPES
from backend.core.errors import EngineError, ModelNotFoundError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
CONVERSION_INFO = "flab_conversion.json"  # written last: its presence means the folder is complete
CONVERT_COMMAND = "python -m backend.tools.convert_gguf IN.gguf OUT_DIR --dtype bfloat16"


@dataclass(frozen=True)
class ConversionProgress:
    """One report of building or converting a model: `stage`, and how far it is (`done` of `total` steps)."""

    stage: Literal["wait", "read", "tokenizer", "dequantize", "write", "build", "done"]  # wait: another holds the lock
    done: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    num_tensors: int
    name: str | None


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read the header of a GGUF file; EngineError for a missing, corrupt, truncated or unsupported one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UnsupportedModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise UnsupportedModelError(
            "converting GGUF needs the `gguf` package: python3 -m pip install gguf accelerate"
        ) from e
    try:
        reader = GGUFReader(path)
        arch_field = reader.fields.get("general.architecture")
        name_field = reader.fields.get("general.name")
        architecture = str(arch_field.contents()) if arch_field is not None else ""
        name = str(name_field.contents()) if name_field is not None else None
        _check_tensor_extents(reader, path)
    except EngineError:
        raise
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on a damaged file
        raise UnsupportedModelError(
            f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e}); download it again"
        ) from e
    if not architecture:
        raise UnsupportedModelError(f"{path} names no general.architecture; it is not a model GGUF")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: transformers cannot read GGUF models of architecture {architecture!r} "
            f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return GGUFInfo(architecture, len(reader.tensors), name)


def _check_tensor_extents(reader, path: Path) -> None:
    """Every tensor's bytes lie inside the file (a truncated download ends inside the tensor data)."""
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise UnsupportedModelError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + t.n_bytes:,} but the file "
                f"has {size:,}; download it again"
            )


def is_converted(folder: str | Path) -> bool:
    """True when `folder` holds a finished conversion (its info file is written last)."""
    folder = Path(folder)
    return (folder / CONVERSION_INFO).is_file() and (folder / "config.json").is_file()


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    progress: Callable[[ConversionProgress], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Dequantize `gguf_path` and write config.json, model.safetensors and the tokenizer files into `out_dir`.

    The folder is written next to `out_dir` under a temporary name and renamed into place when complete, so an
    interrupted conversion never leaves a half-written model. Raises EngineError subclasses for a bad file, an
    architecture transformers cannot read, an unknown dtype, or an `out_dir` that already holds files
    (unless `overwrite`).
    """
    if dtype not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    report = progress or (lambda p: None)
    report(ConversionProgress("read"))
    info = inspect_gguf(gguf_path)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise EngineError(f"{out_dir} already exists and is not an empty folder; pick another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        model, tokenizer = _load_dequantized(gguf_path, DTYPES[dtype], report)
        report(ConversionProgress("write", 3, 4))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # it marks the checkpoint as GGUF; the weights are plain now
        config.architectures = [type(model).__name__]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERSION_INFO).write_text(
            json.dumps(
                dict(
                    source=gguf_path.name,
                    source_bytes=gguf_path.stat().st_size,
                    architecture=info.architecture,
                    gguf_name=info.name,
                    dtype=dtype,
                ),
                indent=1,
            )
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is an ordinary folder
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report(ConversionProgress("done", 1, 1))
    return out_dir


def _load_dequantized(path: Path, dtype: torch.dtype, report: Callable[[ConversionProgress], None]):
    try:
        import accelerate  # noqa: F401 - transformers' GGUF loader needs it
    except ImportError as e:
        raise UnsupportedModelError(
            "converting GGUF needs the `accelerate` package: python3 -m pip install gguf accelerate"
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        report(ConversionProgress("tokenizer", 1, 4))  # the slow part: the vocabulary and merges become a tokenizer
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        report(ConversionProgress("dequantize", 2, 4))
        # dequantize=True: plain dense weights (transformers would otherwise keep GGUF blocks for its kernels)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except EngineError:
        raise
    except Exception as e:  # a file the header check passed but transformers cannot map
        raise UnsupportedModelError(f"transformers could not read {path} ({type(e).__name__}: {e})") from e
    return model, tokenizer
