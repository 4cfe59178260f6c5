"""Quality and speed of each quantization method, in one table.

    python -m backend.tools.bench_quant                                   # the trained tiny model (trains it once)
    python -m backend.tools.bench_quant --model smollm2-135m-instruct --dtype float32 --skip-speed  # a real model
    python -m backend.tools.bench_quant --model tiny:smollm2-135m --skip-quality   # speed on a 135M shape

For each implementation and method (full precision, then int8, int4 ...) the engine is loaded and measured:
quality as the mean token NLL / perplexity of a fixed held-out text (Python's collections source, in windows)
scored with `prompt_logprobs`, plus top-1 agreement with full precision; speed as batch-1 decode tok/s
(128 prompt tokens, 128 new) and the output tok/s of a batch of 8 (backend.tools.bench's engine runner). The
default model is trained by backend.tools.train_tiny (random weights score ~ln(vocab) whatever the method).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from backend import Engine, SamplingParams
from backend.core.config import MODEL_IMPLS
from backend.loading.train_tiny import EVAL_MODULE, eval_text
from backend.tools.bench import (
    BenchOptions,
    Workload,
    default_json_path,
    measure_memory_bandwidth,
    resolve_path,
    run_engine,
)

DEFAULT_METHODS = ("none", "int8", "int4", "int4:g32", "fp8")


@dataclass
class Row:
    impl: str
    method: str
    weights_bytes: int = 0  # as stored (without the fp32 compute copies of layers/upcast.py), as backend.tools.bench
    eval_tokens: int = 0  # scored tokens
    nll: float | None = None  # mean token NLL (nats)
    ppl: float | None = None
    delta_nll: float | None = None  # vs full precision, with the standard error of the paired per-token differences
    delta_nll_se: float | None = None
    top1_agree: float | None = None  # share of positions whose top token equals full precision's
    prefill_tok_s: float | None = None  # of the scoring pass (all windows in one batch, chunked by the engine)
    decode_tok_s: float | None = None  # batch 1
    ttft_ms: float | None = None
    weight_bandwidth_gbs: float | None = None
    batch_tok_s: float | None = None  # output tok/s of the batch
    error: str | None = None


def eval_windows(engine: Engine, num_windows: int, window: int) -> list[list[int]]:
    """The held-out text's first num_windows * window tokens, cut into prompts of `window` tokens."""
    ids = engine.tokenizer.encode(eval_text())
    if len(ids) < num_windows * window:
        raise ValueError(f"the eval text has {len(ids)} tokens, fewer than {num_windows} x {window}")
    return [ids[i * window : (i + 1) * window] for i in range(num_windows)]


def score(engine: Engine, windows: list[list[int]]) -> tuple[list[float], list[int]]:
    """Logprob of every scored token of every window, and the top-1 token at each of those positions."""
    params = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = engine.generate(prompt_token_ids=windows, sampling_params=params)
    logprobs = [lp for o in outs for lp in o.prompt_logprobs[1:]]
    top1 = [top[0][0] for o in outs for top in o.prompt_top_logprobs[1:]]
    return logprobs, top1


Scores = tuple[list[float], list[int]]  # per scored token: logprob, top-1 token


def measure_quality(path: str, impl: str, method: str | None, args, row: Row, reference: Scores | None) -> Scores:
    with Engine(path, model_impl=impl, quantization=method, dtype=args.dtype, device=args.device) as engine:
        row.weights_bytes = engine.decode_weight_bytes
        windows = eval_windows(engine, args.eval_windows, args.eval_len)
        score(engine, windows[:1])  # warm-up
        t = time.perf_counter()
        logprobs, top1 = score(engine, windows)
        row.prefill_tok_s = sum(map(len, windows)) / (time.perf_counter() - t)
    row.eval_tokens = len(logprobs)
    row.nll = -sum(logprobs) / len(logprobs)
    row.ppl = math.exp(row.nll)
    if reference is not None:
        diffs = [ref - lp for lp, ref in zip(logprobs, reference[0])]
        row.delta_nll = statistics.fmean(diffs)
        row.delta_nll_se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        row.top1_agree = sum(a == b for a, b in zip(top1, reference[1])) / len(top1)
    return logprobs, top1


def speed_workloads(vocab: int, args) -> tuple[Workload, Workload]:
    rng = random.Random(args.seed)
    prompt = lambda: [rng.randrange(10, vocab - 10) for _ in range(args.prompt_len)]  # noqa: E731
    latency = Workload("latency", [prompt()], [args.new_tokens])
    batch = Workload(f"batch{args.batch}", [prompt() for _ in range(args.batch)], [args.new_tokens] * args.batch)
    return latency, batch


def measure_speed(path: str, impl: str, method: str | None, args, row: Row, vocab: int) -> None:
    latency, batch = speed_workloads(vocab, args)
    engine_args = BenchOptions(dtype=args.dtype, device=args.device, quantization=method)
    # best of `repeats` runs: on a shared machine the fastest run is the least disturbed one
    res = max((run_engine(path, impl, latency, engine_args) for _ in range(args.repeats)), key=lambda r: r.decode_tok_s)
    row.decode_tok_s, row.ttft_ms, row.weight_bandwidth_gbs = res.decode_tok_s, res.ttft_ms, res.weight_bandwidth_gbs
    row.batch_tok_s = max(run_engine(path, impl, batch, engine_args).output_tok_s for _ in range(args.repeats))
    if not row.weights_bytes:
        with Engine(path, model_impl=impl, quantization=method, dtype=args.dtype, device=args.device) as engine:
            row.weights_bytes = engine.decode_weight_bytes


def run(path: str, args) -> list[Row]:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).get_text_config().vocab_size
    rows = []
    for impl in args.impls:
        reference = None  # full precision's scores, measured first
        for name in sorted(args.methods, key=lambda m: m.lower() != "none"):
            method = None if name.lower() == "none" else name
            row = Row(impl, name)
            try:
                if not args.skip_quality:
                    scores = measure_quality(path, impl, method, args, row, reference)
                    if method is None:
                        reference = scores
                if not args.skip_speed:
                    measure_speed(path, impl, method, args, row, vocab)
            except Exception as e:  # a method that cannot run here is reported, not fatal
                row.error = f"{type(e).__name__}: {e}"
            rows.append(row)
            print(_progress(row), flush=True)
            gc.collect()
    return rows


def _progress(row: Row) -> str:
    if row.error:
        return f"{row.impl:12s} {row.method:10s} error: {row.error}"
    nll = "-" if row.nll is None else f"{row.nll:.4f}"
    dec = "-" if row.decode_tok_s is None else f"{row.decode_tok_s:.1f}"
    return f"{row.impl:12s} {row.method:10s} NLL {nll}  decode {dec} tok/s  {row.weights_bytes / 2**20:.2f} MiB"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    "impl",
    "method",
    "weights MiB",
    "NLL (nats/token)",
    "PPL",
    "ΔNLL vs full",
    "top-1 = full",
    "prefill tok/s",
    "TTFT ms",
    "batch-1 decode tok/s",
    "weight GB/s",
    "batch-{batch} output tok/s",
)


def markdown(rows: list[Row], batch: int) -> str:
    header = [c.format(batch=batch) for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.impl} | {r.method} | error: {r.error[:80]} |" + " |" * (len(header) - 3))
            continue
        delta = "-" if r.delta_nll is None else f"{r.delta_nll:+.4f} ± {r.delta_nll_se:.4f}"
        cells = [
            r.impl,
            r.method,
            f"{r.weights_bytes / 2**20:.2f}",
            _fmt(r.nll, ".4f"),
            _fmt(r.ppl, ".2f"),
            delta,
            _fmt(r.top1_agree, ".1%"),
            _fmt(r.prefill_tok_s, ".0f"),
            _fmt(r.ttft_ms, ".0f"),
            _fmt(r.decode_tok_s, ".1f"),
            _fmt(r.weight_bandwidth_gbs, ".2f"),
            _fmt(r.batch_tok_s, ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny:trained",
        help="a built-in name (tiny:trained, the default; smollm2-135m-instruct; tiny:<arch>), a folder or a Hub id",
    )
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="none = full precision")
    impls = [impl for impl in MODEL_IMPLS if impl != "auto"]
    parser.add_argument("--impls", nargs="+", default=["native"], choices=impls)
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto = the checkpoint's (the large tiny:<shape> models are stored in bf16, the small ones in fp32)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--eval-windows", type=int, default=16, help="prompts scored for the NLL")
    parser.add_argument("--eval-len", type=int, default=256, help="tokens per scored prompt")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="speed runs per method; the best one is reported")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=None, help="write the rows here (default: bench_quant-<time>.json in the project cache)"
    )
    args = parser.parse_args(argv)
    path = resolve_path(args.model, args.dtype)
    device = BenchOptions(device=args.device).torch_device
    bandwidth = measure_memory_bandwidth(device)
    t0 = time.perf_counter()
    rows = run(path, args)
    text = (
        ""
        if args.skip_quality
        else f"eval text: {args.eval_windows} x {args.eval_len} tokens of Python "
        f"{platform.python_version()}'s {EVAL_MODULE} module source | "
    )
    header = (
        f"{platform.node()} | {platform.processor() or platform.machine()} | {psutil.cpu_count()} cores | "
        f"torch {torch.__version__} | device {device} | model {args.model} | dtype {args.dtype} | {text}"
        f"measured memory bandwidth {bandwidth / 1e9:.1f} GB/s | {time.perf_counter() - t0:.0f}s"
    )
    print("\n" + header + "\n\n" + markdown(rows, args.batch))
    out = Path(args.json) if args.json else default_json_path("bench_quant")
    record = dict(header=header, args=vars(args), path=path, memory_bandwidth=bandwidth, rows=[asdict(r) for r in rows])
    out.write_text(json.dumps(record, indent=1))
    print(f"rows: {out}")
    return rows


if __name__ == "__main__":
    main()
