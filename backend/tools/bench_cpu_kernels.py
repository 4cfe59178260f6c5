"""A/B of our C++ CPU kernels against the torch path, in one process, rounds alternating (medians and ratios).

    python -m backend.tools.bench_cpu_kernels --model smollm2-135m-instruct --rounds 3

Two engines of the same model stay loaded (`cpu_kernels="fused"` and `"torch"`); each round runs, on each engine
in turn: batch-1 decode (a 128-token prompt, 128 new tokens: decode tok/s after the first token, and the time to
the first token) and the throughput workload of backend/tools/bench.py (32 requests, prompts of 32-256 tokens,
32-128 new tokens each; output tok/s). EOS is ignored; greedy. Prints a markdown table with the machine's flags,
the kernels' instruction set and the copy bandwidth (the decode bound is that over the bytes a decode step reads).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from backend import Engine, SamplingParams
from backend.tools.bench import kv_blocks_for, make_workloads, measure_memory_bandwidth, resolve_path

MODES = ("fused", "torch")


def _latency(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(decode tok/s after the first token, ms to the first token) of one request."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = engine.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
    return (len(out.token_ids) - 1) / (out.latency - out.ttft), out.ttft * 1000


def _throughput(engine: Engine, prompts: list[list[int]], lens: list[int]) -> float:
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lens]
    engine.reset_prefix_cache()
    t = time.perf_counter()
    outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--impl", default="native", choices=("native", "transformers"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default=None, help="e.g. int4, int8 (on-the-fly weight-only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_path(args.model, args.dtype)
    latency, throughput = make_workloads(["latency", "throughput"], 10_000, args.num_requests, seed=0)
    engines = {
        mode: Engine(
            path,
            model_impl=args.impl,
            dtype=args.dtype,
            device="cpu",
            cpu_kernels=mode,
            quantization=args.quantization,
            max_num_seqs=args.num_requests,
            num_kv_blocks=kv_blocks_for(throughput) + kv_blocks_for(latency),
        )
        for mode in MODES
    }
    info = engines["fused"].describe()
    if info["cpu_kernels"] != "fused":
        raise SystemExit(f"the C++ kernels do not run here: {info['cpu_kernels_reason']}")
    runs: dict[str, dict[str, list[float]]] = {m: {"decode": [], "ttft": [], "throughput": []} for m in MODES}
    for engine in engines.values():  # warm-up: first-call allocations, oneDNN primitive caches
        _latency(engine, latency.prompts[0][:16], 4)
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            decode, ttft = _latency(engines[mode], latency.prompts[0], latency.output_lens[0])
            runs[mode]["decode"].append(decode)
            runs[mode]["ttft"].append(ttft)
        for mode in order:
            runs[mode]["throughput"].append(_throughput(engines[mode], throughput.prompts, throughput.output_lens))
        print(
            f"round {r + 1}: "
            + "  ".join(f"{m} {runs[m]['decode'][-1]:.1f}/{runs[m]['throughput'][-1]:.1f}" for m in MODES)
        )
    med = {m: {k: statistics.median(v) for k, v in runs[m].items()} for m in MODES}
    bandwidth = measure_memory_bandwidth(torch.device("cpu"))
    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, kernels: "
        f"{info['cpu_kernels_reason']}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; {args.model} {args.dtype} "
        f"{args.quantization or 'unquantized'} {args.impl}; {args.rounds} alternating rounds, median\n"
    )
    print("| path | batch-1 decode tok/s | % of bound | TTFT ms (128 tokens) | 32 requests output tok/s |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        weight_bytes = engines[mode].decode_weight_bytes
        bound = bandwidth / weight_bytes
        m = med[mode]
        share = 100 * m["decode"] / bound
        print(f"| {mode} | {m['decode']:.1f} | {share:.0f}% | {m['ttft']:.0f} | {m['throughput']:.1f} |")
    f, t = med["fused"], med["torch"]
    print(
        f"| fused / torch | {f['decode'] / t['decode']:.2f}x | | {f['ttft'] / t['ttft']:.2f}x | "
        f"{f['throughput'] / t['throughput']:.2f}x |"
    )
    for engine in engines.values():
        engine.close()
    return {"runs": runs, "median": med, "bandwidth": bandwidth}


if __name__ == "__main__":
    main()
