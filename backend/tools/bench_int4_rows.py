"""int4 products by row count: our kernel's two routes (flab_kernels/cpu `linear_int4`: the group-wise tile over the
packed codes, and the weight dequantized once then torch's GEMM) against the quantized module's own
(`torch._weight_int4pack_mm_for_cpu`, the `cpu_int4pack` kernel), on one layer's four products of a model shape.

    python -m backend.tools.bench_int4_rows --rows 1 4 8 16 32 64 128 512 --threads 2

Both in one process, alternating per round, medians; bf16 activations, bf16 scale / offset pairs (on-the-fly
`int4` of a bf16 model). Prints one line per row count: microseconds per layer for each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from backend.paths import cache_dir
from flab_kernels.cpu import build, ops
from flab_kernels.quant_torch import int4pack_scales_and_zeros, int4pack_weight

# SmolLM2-135M: hidden 576, 9 + 3 + 3 heads of 64, intermediate 1536; (N, K, group) of qkv, o, gate_up, down
SHAPES = [(960, 576, 64), (576, 576, 64), (3072, 576, 64), (576, 1536, 128)]


def _weights(n: int, k: int, group: int, gen: torch.Generator):  # -> (torch's packing, ours)
    g = k // group
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, g, generator=gen) / 64).to(torch.bfloat16)
    zeros = torch.randint(-8, 8, (n, g), generator=gen).to(torch.bfloat16)
    pairs = int4pack_scales_and_zeros(scales, zeros)  # (G, N, 2) bf16
    ours = ops.pack_int4_weight((q + 8).to(torch.uint8), pairs[..., 0].t(), pairs[..., 1].t(), group, centered=True)
    return (int4pack_weight(q), pairs), ours


def _time(fn: Callable[[], object], calls: int) -> float:  # microseconds per call
    fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = build.cpu_kernels(cache_dir())
    if not kernels.available:
        raise SystemExit(f"the C++ kernels did not load: {kernels.reason}")
    ext = kernels.module
    gen = torch.Generator().manual_seed(0)
    layer = [(n, k, group, *_weights(n, k, group, gen)) for n, k, group in SHAPES]
    print(f"kernels {ext.isa()}, {args.threads} threads, {args.rounds} rounds (medians), us per layer (4 products)")
    for m in args.rows:
        xs = {k: torch.randn(m, k, generator=gen).to(torch.bfloat16) for _, k, *_ in layer}
        calls = max(3, 2048 // m)

        def tile() -> None:
            for n, k, g, _, p in layer:
                ext.linear_int4(xs[k], p.codes, p.scales, p.offsets, None, n, k, g, mm_rows=m + 1)

        def dequant_mm() -> None:
            for n, k, g, _, p in layer:
                ext.linear_int4(xs[k], p.codes, p.scales, p.offsets, None, n, k, g, mm_rows=0)

        def theirs() -> None:
            for _, k, group, (w, pairs), _ in layer:
                torch._weight_int4pack_mm_for_cpu(xs[k], w, group, pairs)

        times: dict[str, list[float]] = {"tile": [], "dequant+mm": [], "torch int4pack": []}
        for _ in range(args.rounds):
            for name, fn in zip(times, (tile, dequant_mm, theirs)):
                times[name].append(_time(fn, calls))
        cols = "  ".join(f"{name} {statistics.median(t):9.1f}" for name, t in times.items())
        print(f"M={m:4d}  {cols}", flush=True)


if __name__ == "__main__":
    main()
