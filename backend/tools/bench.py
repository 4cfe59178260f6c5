"""Benchmarks against transformers in the same run, reported as ratios.

    python -m backend.tools.bench --model tiny:smollm2-135m --workloads throughput latency shared_prefix

Systems: our engine with `native` and with `transformers`, HF `generate()` (padded batch, sdpa) and HF
`generate_batch` (transformers' continuous batching, per-request output lengths). Every system gets
the same prompts and output lengths (EOS ignored). `--model` takes the engine's built-in names
(backend/loading/builtin.py): `tiny:<arch>` is a random-weight model of that shape (e.g. tiny:smollm2-135m),
built once into the project's cache, so the harness runs offline. `--endpoint URL` adds the `endpoint`
system: the same workload sent to a running OpenAI-compatible server (backend/tools/bench_endpoint.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from backend import Engine, SamplingParams
from backend.core.config import DTYPES, MODEL_IMPLS, EngineConfig, add_engine_flags
from backend.core.host_allocator import keep_freed_memory, release_freed_memory
from backend.tools.bench_endpoint import run_endpoint
from backend.tools.bench_types import BenchOptions, Result, Workload

SYSTEMS = ("flab-native", "flab-transformers", "hf-generate", "hf-generate_batch")
WORKLOADS = ("throughput", "latency", "shared_prefix")


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


def reset_peak_rss() -> None:
    """Start a new peak-RSS window: return the memory glibc keeps, then reset the kernel's high-water mark
    (Linux: writing 5 to /proc/self/clear_refs), so one run's peak does not carry over to the next."""
    gc.collect()
    release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """The process's resident high-water mark (VmHWM) since `reset_peak_rss`; the current RSS elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(system: str, wl: Workload, seconds: float, outputs: list[list[int]], device: torch.device) -> Result:
    out_tokens = sum(min(len(o), n) for o, n in zip(outputs, wl.output_lens))
    in_tokens = sum(len(p) for p in wl.prompts)
    return Result(
        system,
        wl.name,
        seconds,
        out_tokens,
        in_tokens,
        out_tokens / seconds,
        (out_tokens + in_tokens) / seconds,
        peak_rss(),
        torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        outputs=outputs,
    )


def kv_blocks_for(wl: Workload, block_size: int = 16) -> int:
    """KV blocks that hold every request of the workload at once, plus the warm-up request's block (as
    generate_batch gets in `_cb_cache_size`: no system runs short of cache, none holds more than it needs)."""
    return sum(-(-(len(p) + n) // block_size) for p, n in zip(wl.prompts, wl.output_lens)) + 1


def run_engine(path: str, impl: str, wl: Workload, opts: BenchOptions) -> Result:
    engine = Engine(
        path,
        model_impl=impl,
        dtype=opts.dtype,
        device=opts.device,
        quantization=opts.quantization,
        trust_remote_code=opts.trust_remote_code,
        max_num_seqs=max(len(wl.prompts), 1),
        max_model_len=opts.max_model_len,
        block_size=16,
        num_kv_blocks=kv_blocks_for(wl, 16),
        tp_size=opts.tp_size,
    )
    try:
        params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in wl.output_lens]
        engine.generate(
            prompt_token_ids=[wl.prompts[0][:8]], sampling_params=SamplingParams(max_new_tokens=2, ignore_eos=True)
        )
        engine.reset_prefix_cache()  # forget the warm-up's cached prefix
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
            res.weight_bandwidth_gbs = engine.decode_weight_bytes * res.decode_tok_s / 1e9
        return res
    finally:
        engine.close()


def _hf_model(path: str, opts: BenchOptions):
    from transformers import AutoModelForCausalLM

    dtype = "auto" if opts.dtype == "auto" else getattr(torch, opts.dtype)
    device = opts.torch_device
    model = (
        AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa", trust_remote_code=opts.trust_remote_code
        )
        .to(device)
        .eval()
    )
    model.generation_config.eos_token_id = None
    return model, device


def run_hf_generate(path: str, wl: Workload, opts: BenchOptions) -> Result:
    """One padded batch (left padding), max_new_tokens = the longest request; each request counts its own length."""
    model, device = _hf_model(path, opts)
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
        gen = model.generate(
            ids, attention_mask=mask, max_new_tokens=max(wl.output_lens), do_sample=False, pad_token_id=0
        )
        _sync(device)
        seconds = time.perf_counter() - t
    outs = [gen[i, width : width + n].tolist() for i, n in enumerate(wl.output_lens)]
    res = _result("hf-generate", wl, seconds, outs, device)
    if first is not None:
        n = wl.output_lens[0]
        res.ttft_ms = first * 1000
        res.tpot_ms = (seconds - first) / (n - 1) * 1000
        res.decode_tok_s = 1000 / res.tpot_ms
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        res.weight_bandwidth_gbs = weight_bytes * res.decode_tok_s / 1e9
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


def run_hf_generate_batch(path: str, wl: Workload, opts: BenchOptions) -> Result:
    """transformers' own continuous batching, each request with its own max_new_tokens."""
    from transformers import GenerationConfig

    model, device = _hf_model(path, opts)
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
    "flab-native": lambda path, wl, opts: run_engine(path, "native", wl, opts),
    "flab-transformers": lambda path, wl, opts: run_engine(path, "transformers", wl, opts),
    "hf-generate": run_hf_generate,
    "hf-generate_batch": run_hf_generate_batch,
    "endpoint": run_endpoint,  # only with --endpoint URL (BenchOptions.endpoint)
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
    from backend.layers.cpu.upcast import cpu_matmul_flags
    from backend.loading.build import choose_cpu_linear

    flags = cpu_matmul_flags()
    model_dtype = DTYPES.get(dtype, torch.float32)
    return (
        f"cpu flags {'/'.join(flags) if flags else 'unknown' if flags is None else 'none'} | "
        f"cpu_linear {choose_cpu_linear('auto', device, model_dtype)}"
    )


@dataclass
class Setup:
    """A resolved model and everything measured once before the systems run."""

    path: str  # local folder
    label: str  # what the user asked for (a Hub id, a folder, tiny:<arch>)
    workloads: list[Workload]
    device: torch.device
    dtype: str  # the model dtype the systems run in ("auto" resolved from the checkpoint)
    bandwidth: float  # bytes/s of a large copy on the device
    malloc: str  # "kept" (host_allocator.keep_freed_memory applied for every system) or "default"

    def header(self) -> str:
        """One line saying where and how the numbers were measured."""
        return (
            f"{platform.node()} | {platform.processor() or platform.machine()} | {psutil.cpu_count()} cores | "
            f"{cpu_summary(self.device, self.dtype)} | freed memory {self.malloc} (all systems) | "
            f"torch {torch.__version__} | device {self.device} | model {self.label} | dtype {self.dtype} | "
            f"measured memory bandwidth {self.bandwidth / 1e9:.1f} GB/s"
        )


def prepare(path: str, workloads: list[str], opts: BenchOptions, label: str | None = None) -> Setup:
    """Seeded workloads for the model at `path` (a local folder) and the machine's copy bandwidth."""
    from transformers import AutoConfig

    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise ValueError(f"workloads must be some of {WORKLOADS}, got {workloads}")
    text_config = AutoConfig.from_pretrained(path, trust_remote_code=opts.trust_remote_code).get_text_config()
    context = opts.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
    device = opts.torch_device
    # process-wide, so set before any system runs: the baselines get the same allocator as our engine
    malloc = "kept" if device.type == "cpu" and keep_freed_memory() else "default"
    wls = make_workloads(workloads, text_config.vocab_size, opts.num_requests, opts.seed, context)
    dtype = opts.dtype if opts.dtype != "auto" else str(getattr(text_config, "dtype", None) or "float32")
    return Setup(
        path, label or path, wls, device, dtype.removeprefix("torch."), measure_memory_bandwidth(device), malloc
    )


def run_all(
    setup: Setup, systems: list[str], opts: BenchOptions, stop: Callable[[], bool] = lambda: False
) -> Iterator[Result]:
    """Every run as it finishes: per workload, the systems round robin `opts.repeat` times (so a slow spell of
    a shared machine hits every system). A system that fails gives a Result with `error` (not fatal).
    `stop()` is checked between runs."""
    unknown = [s for s in systems if s not in RUNNERS]
    if unknown or not systems:
        raise ValueError(f"systems must be some of {SYSTEMS}, got {systems}")
    for wl in setup.workloads:
        for _ in range(opts.repeat):
            for system in systems:
                if stop():
                    return
                reset_peak_rss()
                try:
                    res = RUNNERS[system](setup.path, wl, opts)
                except Exception as e:
                    res = Result(system, wl.name, 0, 0, 0, 0, 0, 0, error=f"{type(e).__name__}: {e}")
                yield res


def medians(runs: list[Result]) -> list[Result]:
    """The median run of each (workload, system), in the order they first ran."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in runs:
        groups.setdefault((r.workload, r.system), []).append(r)
    return [median_run(group) for group in groups.values()]


TABLE_HEADERS = [
    "workload",
    "system",
    "output tok/s",
    "total tok/s",
    "vs HF generate",
    "vs HF generate_batch",
    "peak RSS",
    "TTFT ms",
    "decode tok/s",
    "weight GB/s (of measured)",
]


def table_rows(results: list[Result], bandwidth: float) -> list[list[str]]:
    """One row of TABLE_HEADERS per result; ratios are to the baselines of the same workload."""
    base = {(r.workload, r.system): r.output_tok_s for r in results if r.error is None}
    rows = []
    for r in results:
        if r.error:
            rows.append([r.workload, r.system, f"error: {r.error[:60]}"] + [""] * 7)
            continue

        def ratio(k: str, r: Result = r) -> str:
            return f"{r.output_tok_s / base[r.workload, k]:.2f}x" if (r.workload, k) in base else "-"

        bw = (
            f"{r.weight_bandwidth_gbs:.2f} ({r.weight_bandwidth_gbs * 1e9 / bandwidth:.0%})"
            if r.weight_bandwidth_gbs
            else "-"
        )
        spread = f" ({min(r.repeat_tok_s):.1f}-{max(r.repeat_tok_s):.1f})" if len(r.repeat_tok_s) > 1 else ""
        rows.append(
            [
                r.workload,
                r.system,
                f"{r.output_tok_s:.1f}{spread}",
                f"{r.total_tok_s:.1f}",
                ratio("hf-generate"),
                ratio("hf-generate_batch"),
                f"{r.peak_rss_bytes / 2**30:.2f} GiB",
                "-" if r.ttft_ms is None else f"{r.ttft_ms:.0f}",
                "-" if r.decode_tok_s is None else f"{r.decode_tok_s:.1f}",
                bw,
            ]
        )
    return rows


def markdown(results: list[Result], bandwidth: float) -> str:
    """A table per workload (the rows of `table_rows` without the workload column)."""
    lines = []
    rows = table_rows(results, bandwidth)
    for wl in dict.fromkeys(r[0] for r in rows):
        lines += [f"\n**{wl}**\n", "| " + " | ".join(TABLE_HEADERS[1:]) + " |", "|" + "---|" * 9]
        lines += ["| " + " | ".join(row[1:]) + " |" for row in rows if row[0] == wl]
    return "\n".join(lines)


def write_json(path: str | Path, setup: Setup, results: list[Result], options: dict) -> Path:
    """Every number of a run (the CLI's --json, the app's download): header, options, bandwidth, results."""
    path = Path(path)
    path.write_text(
        json.dumps(
            dict(
                header=setup.header(),
                args=options,
                memory_bandwidth=setup.bandwidth,
                results=[asdict(r) for r in results],
            ),
            indent=1,
        )
    )
    return path


def default_json_path(kind: str) -> Path:
    """<project cache>/bench/<kind>-<local time>.json (backend/paths.py), the folder created."""
    from backend.paths import bench_dir

    folder = bench_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def resolve_path(model: str, dtype: str = "auto") -> str:
    """A built-in name (tiny:<arch>, tiny:trained, smollm2-135m-instruct: backend/loading/builtin.py, built once
    into the project's cache), a Hub id or a folder -> its folder, by the engine's own resolution. Every system
    then loads it in `dtype` (the large tiny:<shape> models are stored in bf16, the small ones in fp32)."""
    from backend.loading.hub import resolve_model

    return str(resolve_model(model))


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default="tiny:smollm2-135m",
        help="a built-in name (tiny:<arch>, smollm2-135m-instruct...), path or Hub id",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--num-requests", type=int, default=32)
    add_engine_flags(  # EngineConfig's declarations; the benchmark's own defaults where it has them
        parser,
        ["dtype", "device", "quantization", "max_model_len", "seed", "trust_remote_code", "tp_size"],
        defaults={**{n: EngineConfig.default(n) for n in ("device", "seed", "trust_remote_code", "tp_size")},
                  "dtype": "bfloat16"},
        help_overrides={
            "quantization": "our engine only (the HF baselines run unquantized)",
            "tp_size": "our engine's tensor-parallel ranks (HF runs on one)",
        },
    )  # fmt: skip
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every system this many times (round robin) and report the median run"
    )
    parser.add_argument(
        "--endpoint",
        default=None,
        help="also run the workload against this OpenAI-compatible server (base URL, e.g. http://127.0.0.1:8000/v1)",
    )
    parser.add_argument("--endpoint-api-key", default=None, help="API key of --endpoint")
    parser.add_argument(
        "--json", default=None, help="write results here (default: bench-<time>.json in the project cache's bench/)"
    )
    parser.add_argument(
        "--model-impl",
        default=None,
        choices=[impl for impl in MODEL_IMPLS if impl != "auto"],
        help="only our engine with this implementation (plus the HF baselines asked for)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.num_requests < 1:
        parser.error("--num-requests must be at least 1")
    systems = [
        s for s in args.systems if not (args.model_impl and s.startswith("flab-") and s != f"flab-{args.model_impl}")
    ]
    opts = BenchOptions(
        args.dtype,
        args.device,
        args.quantization,
        args.max_model_len,
        args.seed,
        args.num_requests,
        args.repeat,
        args.trust_remote_code,
        args.endpoint,
        args.endpoint_api_key,
        args.tp_size,
    )
    if args.endpoint:
        systems.append("endpoint")
    setup = prepare(resolve_path(args.model, args.dtype), args.workloads, opts, label=args.model)
    runs = []
    for res in run_all(setup, systems, opts):
        runs.append(res)
        print(
            f"{res.workload:14s} {res.system:18s} {res.output_tok_s:8.1f} out tok/s"
            + (f"  {res.error}" if res.error else ""),
            flush=True,
        )
    results = medians(runs)
    header = setup.header()
    print("\n" + header + "\n" + markdown(results, setup.bandwidth))
    print(f"results: {write_json(args.json or default_json_path('bench'), setup, results, vars(args))}")
    return results


if __name__ == "__main__":
    main()
