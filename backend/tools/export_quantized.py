"""Our saver: write quantized checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized, FP8 block-wise).

Used by the round-trip tests and to make small quantized models for examples and engine tests:

    python -m backend.tools.export_quantized /tmp/tiny-llama /tmp/tiny-llama-gptq --format gptq --bits 4 --group-size 32

Quantization is round-to-nearest min/max (not GPTQ's/AWQ's calibrated algorithms): the point is the
checkpoint format, which the loaders in this package read back bit-exactly.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from backend.quantization.fp8 import FP8_MAX
from backend.quantization.intquant import quantize_groupwise
from backend.quantization.packing import AWQ_ORDER, pack_int32

FORMATS = ("gptq", "awq", "compressed-tensors", "fp8")


@dataclass
class IntQuantized:
    """Canonical integer form (see intquant.py): W = (q - zeros) * scales, groups by g_idx or k // group_size."""

    q: torch.Tensor  # (N, K) int8 centered
    scales: torch.Tensor  # (N, G)
    zeros: torch.Tensor | None  # (N, G) centered zero codes, None = symmetric
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None  # (K,)

    def dequantize(self) -> torch.Tensor:  # (N, K) float32
        k = self.q.shape[1]
        groups = self.g_idx.long() if self.g_idx is not None else torch.arange(k) // self.group_size
        q = self.q.float()
        if self.zeros is not None:
            q = q - self.zeros.float()[:, groups]
        return q * self.scales.float()[:, groups]


def quantize_int(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
    act_order: torch.Tensor | None = None,
) -> IntQuantized:
    """Round-to-nearest quantization; `act_order` (a permutation of K) groups columns in that order, as
    GPTQ's desc_act does, and yields the matching g_idx."""
    if act_order is None:
        q, scales, zeros = quantize_groupwise(w, bits, group_size, symmetric, scale_dtype)
        return IntQuantized(q, scales, zeros, bits, group_size)
    q_perm, scales, zeros = quantize_groupwise(w[:, act_order], bits, group_size, symmetric, scale_dtype)
    q = torch.empty_like(q_perm)
    q[:, act_order] = q_perm
    g_idx = torch.empty(w.shape[1], dtype=torch.int32)
    g_idx[act_order] = (torch.arange(w.shape[1]) // group_size).to(torch.int32)
    return IntQuantized(q, scales, zeros, bits, group_size, g_idx)


def gptq_tensors(qz: IntQuantized, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    half, mask = 2 ** (qz.bits - 1), 2**qz.bits - 1
    n, k = qz.q.shape
    codes = qz.q.to(torch.int32) + half  # (N, K)
    zero_codes = (
        torch.full(qz.scales.shape, half, dtype=torch.int32) if qz.zeros is None else qz.zeros.to(torch.int32) + half
    )  # (N, G)
    if checkpoint_format == "gptq":
        if bool((zero_codes == 0).any()):
            raise ValueError(
                "the classic GPTQ format (zeros stored minus one) cannot store a zero code of 0; "
                "use checkpoint_format='gptq_v2'"
            )
        zero_codes = zero_codes - 1
    g_idx = qz.g_idx if qz.g_idx is not None else (torch.arange(k) // qz.group_size).to(torch.int32)
    return {
        "qweight": pack_int32(codes.t(), qz.bits, dim=0),  # (K / pack, N)
        "qzeros": pack_int32((zero_codes & mask).t(), qz.bits, dim=1),  # (G, N / pack)
        "scales": qz.scales.t().to(torch.float16).contiguous(),  # (G, N)
        "g_idx": g_idx.to(torch.int32),
    }


def awq_tensors(qz: IntQuantized) -> dict[str, torch.Tensor]:
    if qz.bits != 4 or qz.g_idx is not None:
        raise ValueError("AWQ stores 4-bit weights without act-order")
    codes = (qz.q.to(torch.int32) + 8).t()  # (K, N)
    zero_codes = torch.full(qz.scales.shape, 8, dtype=torch.int32) if qz.zeros is None else qz.zeros.to(torch.int32) + 8
    zero_codes = zero_codes.t()  # (G, N)
    return {
        "qweight": pack_int32(codes, 4, dim=1, order=AWQ_ORDER),  # (K, N / 8)
        "qzeros": pack_int32(zero_codes, 4, dim=1, order=AWQ_ORDER),  # (G, N / 8)
        "scales": qz.scales.t().to(torch.float16).contiguous(),  # (G, N)
    }


def compressed_tensors_tensors(qz: IntQuantized) -> dict[str, torch.Tensor]:
    half = 2 ** (qz.bits - 1)
    n, k = qz.q.shape
    out = {
        "weight_packed": pack_int32(qz.q.to(torch.int32) + half, qz.bits, dim=1),  # (N, ceil(K*bits/32))
        "weight_scale": qz.scales.contiguous(),  # (N, G)
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if qz.zeros is not None:
        out["weight_zero_point"] = pack_int32(qz.zeros.to(torch.int32) + half, qz.bits, dim=0)  # (ceil(N*b/32), G)
    return out


def fp8_block_tensors(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """Block-wise FP8 as DeepSeek / HF fine-grained FP8.

    Returns weight (N, K) e4m3 and weight_scale_inv (ceil(N/bn), ceil(K/bk)) float32, W = weight * scale_inv."""
    n, k = w.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    wp = torch.nn.functional.pad(w.float(), (0, gk * bk - k, 0, gn * bn - n))
    blocks = wp.view(gn, bn, gk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)  # (gn, gk)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(gn * bn, gk * bk)[:n, :k]
    return {"weight": q.to(torch.float8_e4m3fn).contiguous(), "weight_scale_inv": scale.contiguous()}


def quantization_config(
    fmt: str,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    block: tuple[int, int] = (128, 128),
) -> dict:
    """The config.json `quantization_config` that describes what `linear_tensors` writes."""
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": symmetric,
            "checkpoint_format": checkpoint_format,
        }
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    if fmt == "compressed-tensors":
        strategy = "group" if group_size > 0 else "channel"
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "input_activations": None,
                    "weights": {
                        "num_bits": bits,
                        "type": "int",
                        "symmetric": symmetric,
                        "strategy": strategy,
                        "group_size": group_size if group_size > 0 else None,
                        "dynamic": False,
                    },
                }
            },
        }
    raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


def linear_tensors(
    fmt: str,
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    checkpoint_format: str = "gptq",
    block: tuple[int, int] = (128, 128),
    act_order: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (suffix -> tensor) of one linear weight (N, K) in format `fmt`."""
    if fmt == "fp8":
        return fp8_block_tensors(w, block)
    k = w.shape[1]
    gs = k if group_size <= 0 else group_size
    scale_dtype = torch.float16 if fmt in ("gptq", "awq") else torch.bfloat16
    qz = quantize_int(w, bits, gs, symmetric, scale_dtype, act_order)
    if fmt == "gptq":
        return gptq_tensors(qz, checkpoint_format)
    if fmt == "awq":
        return awq_tensors(qz)
    if fmt == "compressed-tensors":
        return compressed_tensors_tensors(qz)
    raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")


def linear_prefixes(config_dir: Path, skip: tuple[str, ...] = ("lm_head",)) -> set[str]:
    """Names of the nn.Linear modules of the model in `config_dir` (built on meta), minus `skip`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from backend.quantization.base import module_matches

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(module_matches(name, s) for s in skip)
    }


def export_checkpoint(
    src: Path,
    dst: Path,
    fmt: str,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    checkpoint_format: str = "gptq",
    block: tuple[int, int] = (128, 128),
) -> list[str]:
    """Quantize the linear weights of the safetensors checkpoint in `src` into `dst` (other files copied)."""
    from safetensors import safe_open

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    prefixes = linear_prefixes(src)
    out: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                prefix, _, attr = name.rpartition(".")
                if attr == "weight" and prefix in prefixes:
                    for suffix, t in linear_tensors(
                        fmt, tensor, bits, group_size, symmetric, checkpoint_format, block
                    ).items():
                        out[f"{prefix}.{suffix}"] = t
                    quantized.append(prefix)
                else:
                    out[name] = tensor
    save_file(out, str(dst / "model.safetensors"))
    for file in src.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "model.safetensors.index.json":
            shutil.copy(file, dst / file.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(
        fmt, bits, group_size, symmetric, False, checkpoint_format, block
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return sorted(quantized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sym", action="store_true")
    parser.add_argument("--checkpoint-format", default="gptq", choices=("gptq", "gptq_v2"))
    args = parser.parse_args()
    done = export_checkpoint(
        Path(args.src), Path(args.dst), args.format, args.bits, args.group_size, args.sym, args.checkpoint_format
    )
    print(f"quantized {len(done)} linear layers into {args.dst}")


if __name__ == "__main__":
    main()
