"""MoE experts quantized on the fly (backend/quantization/experts.py) cut to a rank's slice of their intermediate size.

Such experts hold one quantized linear per expert and weight (`<experts>.flab_quantized`: up = gate_up or up,
down) beside meta placeholders of the stacked parameters. The split that the full-precision rules apply to a
stacked parameter is applied to every expert's linear instead: a split of its output features (the up
projection's intermediate rows: gate half [a, b) and up half [I + a, I + b), or [a, b) without a gate) with
`take_rows`, a split of its input features (the down projection's intermediate columns [a, b)) with `take_cols`,
whose int4 / fp8 group check refuses a split that does not hold whole quantization groups. The placeholders get
the shard's shapes. The module's outputs are then partial sums, added over ranks as for full-precision experts.
"""

from __future__ import annotations

from torch import nn

from backend.core.errors import UnsupportedModelError
from backend.distributed.slicing import ranges_index, take_cols, take_rows
from backend.quantization.experts import QuantizedExperts, quantized_placeholder


def is_quantized_stack(module: nn.Module, name: str) -> bool:
    """Whether `module.name` is the meta placeholder of stacked experts weights quantized per expert."""
    param = getattr(module, name, None)
    holder = getattr(module, "flab_quantized", None)
    return isinstance(holder, QuantizedExperts) and isinstance(param, nn.Parameter) and param.is_meta


def shard_quantized_stack(
    module: nn.Module, name: str, dim: int, ranges: list[tuple[int, int]], transposed: bool, where: str
) -> None:
    """Slice the per-expert linears behind placeholder `module.name` as a split of its stacked dim `dim` (1 or 2
    of (E, N, K), or of (E, K, N) when `transposed`) to `ranges` would; the placeholder takes the new shape."""
    holder: QuantizedExperts = module.flab_quantized
    placeholder = getattr(module, name)
    linears = holder.down if name == "down_proj" else holder.up
    splits_outputs = (dim == 1) != transposed  # the split dim is the per-expert weight's N (output features)
    for e in range(len(linears)):
        linear, path = linears[e], f"{where}.{e}"
        if splits_outputs:
            linears[e] = take_rows(linear, ranges_index(ranges, linear.w_q.device), path)
            continue
        if len(ranges) != 1:
            raise UnsupportedModelError(
                f"{where}: a packed split of the experts' input features is not a layout the engine runs"
            )
        sliced, bias = take_cols(linear, ranges[0][0], ranges[0][1], path)
        if bias is not None:  # quantize_dense makes bias-free linears: expert biases stay module parameters
            raise UnsupportedModelError(
                f"{path}: a row-parallel expert bias would be added once per rank; use tp_size=1"
            )
        linears[e] = sliced
    shape = list(placeholder.shape)
    shape[dim] = sum(b - a for a, b in ranges)
    setattr(module, name, quantized_placeholder(tuple(shape), placeholder.dtype))
