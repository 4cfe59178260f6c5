"""Benchmarks against transformers in the same run, reported as ratios.

    python -m backend.bench --model tiny:smollm2-135m --workloads throughput latency shared_prefix

Systems: our engine with `native` and with `transformers`, HF `generate()` (padded batch, sdpa) and HF
`generate_batch` (transformers' continuous batching, per-request output lengths). Every system gets
the same prompts and output lengths (EOS ignored). `--model tiny:<arch>` builds a random-weight model
of that shape (e.g. tiny:smollm2-135m) so the harness runs offline.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from backend import Engine, SamplingParams
from backend.config import DTYPES

SYSTEMS = ("flab-native", "flab-transformers", "hf-generate", "hf-generate_batch")


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]


@dataclass
class Result:
    system: str
    workload: str
    seconds: float
    output_tokens: int
    input_tokens: int
    output_tok_s: float
    total_tok_s: float
    peak_rss_bytes: int
    cuda_peak_bytes: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    decode_tok_s: float | None = None
    weight_bandwidth_gbs: float | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    error: str | None = None
    repeat_tok_s: list[float] = field(default_factory=list)  # output tok/s of every repeat (this is the median one)


def make_workloads(names: list[str], vocab: int, num_requests: int, seed: int, context: int = 4096) -> list[Workload]:
    """Seeded workloads; the shared system prompt is 512 tokens, or half the context of a model with less."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(10, vocab - 10) for _ in range(n)]  # noqa: E731
    out = []
    for name in names:
        if name == "throughput":
            prompts = [tok(rng.randint(32, 256)) for _ in range(num_requests)]
            out.append(Workload(name, prompts, [rng.randint(32, 128) for _ in range(num_requests)]))
        elif name == "latency":
            out.append(Workload(name, [tok(128)], [128]))
        elif name == "shared_prefix":
            system = tok(min(512, context // 2))
            prompts = [system + tok(rng.randint(8, 32)) for _ in range(num_requests)]
            out.append(Workload(name, prompts, [32] * num_requests))
        else:
            raise SystemExit(f"unknown workload {name!r}")
    return out


def measure_memory_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(system: str, wl: Workload, seconds: float, outputs: list[list[int]], device: torch.device) -> Result:
    out_tokens = sum(min(len(o), n) for o, n in zip(outputs, wl.output_lens))
    in_tokens = sum(len(p) for p in wl.prompts)
    return Result(system, wl.name, seconds, out_tokens, in_tokens, out_tokens / seconds,
                  (out_tokens + in_tokens) / seconds, psutil.Process().memory_info().rss,
                  torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0, outputs=outputs)


def run_engine(path: str, impl: str, wl: Workload, args) -> Result:
    engine = Engine(path, model_impl=impl, dtype=args.dtype, device=args.device, quantization=args.quantization,
                    max_num_seqs=max(len(wl.prompts), 1), max_model_len=args.max_model_len)
    try:
        params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in wl.output_lens]
        engine.generate(prompt_token_ids=[wl.prompts[0][:8]], sampling_params=SamplingParams(max_new_tokens=2,
                                                                                            ignore_eos=True))
        engine.allocator.__init__(engine.allocator.num_blocks, engine.allocator.block_size,
                                  engine.allocator.enable_prefix_caching)  # forget the warm-up's cached prefix
        _sync(engine.device)
        t = time.perf_counter()
        outs = engine.generate(prompt_token_ids=wl.prompts, sampling_params=params)
        _sync(engine.device)
        res = _result(f"flab-{impl}", wl, time.perf_counter() - t, [o.token_ids for o in outs], engine.device)
        if wl.name == "latency":
            o = outs[0]
            res.ttft_ms = o.ttft * 1000
            res.tpot_ms = (o.latency - o.ttft) / (len(o.token_ids) - 1) * 1000
            res.decode_tok_s = 1000 / res.tpot_ms
            res.weight_bandwidth_gbs = engine.loaded.decode_weight_bytes * res.decode_tok_s / 1e9
        return res
    finally:
        engine.close()


def _hf_model(path: str, args):
    from transformers import AutoModelForCausalLM

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    model.generation_config.eos_token_id = None
    return model, device


def run_hf_generate(path: str, wl: Workload, args) -> Result:
    """One padded batch (left padding), max_new_tokens = the longest request; each request counts its own length."""
    model, device = _hf_model(path, args)
    width = max(len(p) for p in wl.prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in wl.prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in wl.prompts], device=device)
    with torch.inference_mode():
        model.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, do_sample=False, pad_token_id=0)
        _sync(device)
        t = time.perf_counter()
        first = None
        if wl.name == "latency":
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
            _sync(device)
            first = time.perf_counter() - t
            t = time.perf_counter()
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=max(wl.output_lens), do_sample=False,
                             pad_token_id=0)
        _sync(device)
        seconds = time.perf_counter() - t
    outs = [gen[i, width: width + n].tolist() for i, n in enumerate(wl.output_lens)]
    res = _result("hf-generate", wl, seconds, outs, device)
    if first is not None:
        n = wl.output_lens[0]
        res.ttft_ms = first * 1000
        res.tpot_ms = (seconds - first) / (n - 1) * 1000
        res.decode_tok_s = 1000 / res.tpot_ms
        res.weight_bandwidth_gbs = sum(p.numel() * p.element_size() for p in model.parameters()) * res.decode_tok_s / 1e9
    return res


def _cb_cache_size(wl: Workload, page_size: int = 256) -> dict:
    """generate_batch sizes its KV cache from 90% of free memory, which on a CPU means many GB of host RAM:
    give it enough pages for the whole workload at once (never short of blocks, like our engine here)."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # older transformers: its own sizing
        return {}
    pages = sum(-(-(len(p) + n) // page_size) for p, n in zip(wl.prompts, wl.output_lens))
    return {"continuous_batching_config": ContinuousBatchingConfig(page_size=page_size, num_blocks=pages + 1)}


def run_hf_generate_batch(path: str, wl: Workload, args) -> Result:
    """transformers' own continuous batching, each request with its own max_new_tokens."""
    from transformers import GenerationConfig

    model, device = _hf_model(path, args)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(wl.output_lens), eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config, **_cb_cache_size(wl))
    manager.start()
    try:
        t = time.perf_counter()
        for i, (p, n) in enumerate(zip(wl.prompts, wl.output_lens)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        results: dict[str, list[int]] = {}
        while len(results) < len(wl.prompts):
            r = manager.get_result(timeout=600)
            if r is None:
                raise RuntimeError("generate_batch stopped without returning every request")
            if r.is_finished():
                results[r.request_id] = list(r.generated_tokens)
        seconds = time.perf_counter() - t
    finally:
        manager.stop(block=True, timeout=30)
    outs = [results[f"r{i}"] for i in range(len(wl.prompts))]
    return _result("hf-generate_batch", wl, seconds, outs, device)


RUNNERS = {
    "flab-native": lambda path, wl, args: run_engine(path, "native", wl, args),
    "flab-transformers": lambda path, wl, args: run_engine(path, "transformers", wl, args),
    "hf-generate": run_hf_generate,
    "hf-generate_batch": run_hf_generate_batch,
}


def median_run(runs: list[Result]) -> Result:
    """The run with the median output tok/s (an error if any repeat failed), with every repeat's tok/s."""
    failed = [r for r in runs if r.error]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r.output_tok_s)
    chosen = ordered[(len(ordered) - 1) // 2]
    chosen.repeat_tok_s = [r.output_tok_s for r in runs]
    return chosen


def cpu_summary(device: torch.device, dtype: str) -> str:
    """The CPU flags that decide how 16-bit linears run, and the path `cpu_linear="auto"` takes."""
    from backend.build import choose_cpu_linear
    from backend.layers.upcast import cpu_matmul_flags

    flags = cpu_matmul_flags()
    model_dtype = DTYPES.get(dtype, torch.float32)
    return (f"cpu flags {'/'.join(flags) if flags else 'unknown' if flags is None else 'none'} | "
            f"cpu_linear {choose_cpu_linear('auto', device, model_dtype)}")


def markdown(results: list[Result], bandwidth: float) -> str:
    lines = []
    for wl in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == wl]
        base = {r.system: r.output_tok_s for r in rows if r.error is None}
        lines += [f"\n**{wl}**\n", "| system | output tok/s | total tok/s | vs HF generate | vs HF generate_batch "
                  "| peak RSS | TTFT ms | decode tok/s | weight GB/s (of measured) |", "|" + "---|" * 9]
        for r in rows:
            if r.error:
                lines.append(f"| {r.system} | error: {r.error[:60]} |" + " |" * 7)
                continue
            ratio = lambda k: f"{r.output_tok_s / base[k]:.2f}x" if k in base else "-"  # noqa: E731
            bw = (f"{r.weight_bandwidth_gbs:.2f} ({r.weight_bandwidth_gbs * 1e9 / bandwidth:.0%})"
                  if r.weight_bandwidth_gbs else "-")
            spread = (f" ({min(r.repeat_tok_s):.1f}-{max(r.repeat_tok_s):.1f})" if len(r.repeat_tok_s) > 1 else "")
            lines.append(f"| {r.system} | {r.output_tok_s:.1f}{spread} | {r.total_tok_s:.1f} | {ratio('hf-generate')} | "
                         f"{ratio('hf-generate_batch')} | {r.peak_rss_bytes / 2**30:.2f} GiB | "
                         f"{'-' if r.ttft_ms is None else f'{r.ttft_ms:.0f}'} | "
                         f"{'-' if r.decode_tok_s is None else f'{r.decode_tok_s:.1f}'} | {bw} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:smollm2-135m", help="path, Hub id, or tiny:<arch>")
    parser.add_argument("--workloads", nargs="+", default=["throughput", "latency", "shared_prefix"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every system this many times (round robin) and report the median run")
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--model-impl", default=None, choices=["native", "transformers"],
                        help="only our engine with this implementation (plus the HF baselines asked for)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.model_impl:
        args.systems = [s for s in args.systems if not s.startswith("flab-") or s == f"flab-{args.model_impl}"]
    path = args.model
    if path.startswith("tiny:"):
        from backend.tiny_models import build_tiny_model

        path = str(build_tiny_model(path[5:], Path(tempfile.mkdtemp()) / "model", dtype=getattr(torch, args.dtype),
                                    init_std=0.02))
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(path).get_text_config()
    vocab = text_config.vocab_size
    context = args.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    bandwidth = measure_memory_bandwidth(device)
    results = []
    for wl in make_workloads(args.workloads, vocab, args.num_requests, args.seed, context):
        runs: dict[str, list[Result]] = {system: [] for system in args.systems}
        for _ in range(args.repeat):  # round robin, so a slow spell of a shared machine hits every system
            for system in args.systems:
                try:
                    res = RUNNERS[system](path, wl, args)
                except Exception as e:  # a baseline that cannot run is reported, not fatal
                    res = Result(system, wl.name, 0, 0, 0, 0, 0, 0, error=f"{type(e).__name__}: {e}")
                runs[system].append(res)
                print(f"{wl.name:14s} {system:18s} {res.output_tok_s:8.1f} out tok/s"
                      + (f"  {res.error}" if res.error else ""), flush=True)
                gc.collect()
        results += [median_run(runs[system]) for system in args.systems]
    header = (f"{platform.node()} | {platform.processor() or platform.machine()} | {psutil.cpu_count()} cores | "
              f"{cpu_summary(device, args.dtype)} | torch {torch.__version__} | device {device} | model {args.model} | "
              f"dtype {args.dtype} | measured memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("\n" + header + "\n" + markdown(results, bandwidth))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, args=vars(args), memory_bandwidth=bandwidth,
                                                   results=[asdict(r) for r in results]), indent=1))
    return results


if __name__ == "__main__":
    main()
