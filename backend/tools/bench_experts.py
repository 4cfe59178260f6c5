"""Weights and batch-1 decode speed of a random-weight Mixtral-shaped MoE: full precision vs int8 vs int4 experts.

    python -m backend.tools.bench_experts                       # bf16, native, 4 layers, 8 experts
    python -m backend.tools.bench_experts --impl transformers --methods none int8 int4 fp8

All engines are loaded in one process and stepped in turn (one decode step each, round after round), so a drift
of the machine's speed hits every method alike. Each engine decodes one request (`--prompt-len` prompt tokens,
`--new-tokens` new, ignore_eos); a method's tok/s is 1 / its median decode step time (the prefill step excluded).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend import Engine, SamplingParams
from backend.loading.tiny_models import build_tiny_model


@dataclass
class Run:
    method: str | None
    engine: Engine
    step_seconds: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.method or f"full precision ({self.engine.describe()['dtype']})"


def build_model(path: Path, args) -> Path:
    return build_tiny_model(
        "mixtral",
        path,
        dtype=getattr(torch, args.dtype),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=args.hidden // 8,
    )


def interleave(runs: list[Run], args) -> None:
    """One request per engine; then rounds of one step per engine until every request has finished."""
    ids = list(range(10, 10 + args.prompt_len))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for run in runs:
        run.engine.add_request(prompt_token_ids=ids, params=params)
        run.engine.step()  # the prefill (and first token): not timed
    while any(run.engine.num_requests for run in runs):
        for run in runs:
            if run.engine.num_requests:
                start = time.perf_counter()
                run.engine.step()
                run.step_seconds.append(time.perf_counter() - start)


def markdown(runs: list[Run]) -> str:
    full = runs[0].engine.weights_bytes
    lines = [
        "| method | weights MiB | experts quantized | batch-1 decode tok/s | ms / step (median) |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        median = statistics.median(run.step_seconds)
        experts = run.engine.describe().get("quantized_experts")
        what = f"{experts['modules']} modules, {experts['experts']} experts" if experts else "no"
        lines.append(
            f"| {run.label} | {run.engine.weights_bytes / 2**20:.2f} ({run.engine.weights_bytes / full:.2f}x) | "
            f"{what} | {1 / median:.1f} | {median * 1e3:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["none", "int8", "int4"], help="none = full precision")
    parser.add_argument("--impl", default="native", choices=["native", "transformers"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "moe", args)
        runs = [
            Run(
                None if m == "none" else m,
                Engine(
                    str(path),
                    model_impl=args.impl,
                    quantization=None if m == "none" else m,
                    dtype=args.dtype,
                    num_kv_blocks=64,
                    max_model_len=args.prompt_len + args.new_tokens + 16,
                ),
            )
            for m in args.methods
        ]
        try:
            interleave(runs, args)
            table = markdown(runs)
        finally:
            for run in runs:
                run.engine.close()
    print(table)
    return table


if __name__ == "__main__":
    main()
