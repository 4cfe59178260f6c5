"""Serving benchmark: one seeded workload sent through the OpenAI HTTP API at several concurrencies.

    python -m backend.tools.bench_serving --model tiny:smollm2-135m --concurrency 1 8 32

Systems (same model folder, same prompts, same output lengths, streaming /v1/completions):
  flab-native, flab-transformers   our server (`python -m backend.launch_server`, a subprocess on loopback)
  engine                           the in-process Engine with the same workload (`engine.stream` from threads):
                                   what HTTP costs
  hf-serve                         `transformers serve <folder> --continuous-batching` (Hugging Face's
                                   OpenAI-compatible server), a subprocess on loopback

Each concurrency level is a closed loop: C clients, each sending its next request when the last one ended.
Reported per system and level: request throughput, output tok/s, TTFT and inter-token latency p50/p90/p99.
Our server and the engine ignore EOS so every request produces its output length; `transformers serve`
has no such option, so its tokens are counted from what it returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

SYSTEMS = ("flab-native", "flab-transformers", "engine", "hf-serve")
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300


@dataclass
class Request:
    prompt: str
    max_tokens: int


@dataclass
class Sample:
    ttft: float | None
    itls: list[float]
    output_tokens: int
    error: str | None = None


@dataclass
class LevelResult:
    system: str
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    errors: int
    request_throughput: float
    output_tok_s: float
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    note: str | None = None


def make_requests(num: int, input_words: int, output_len: int, seed: int) -> list[Request]:
    from backend.loading.tiny_models import CORPUS

    rng = random.Random(seed)
    words = CORPUS.split()
    return [Request(" ".join(rng.choice(words) for _ in range(input_words)), output_len) for _ in range(num)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        return {p: values[0] * 1000 for p in ("p50", "p90", "p99")}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49] * 1000, "p90": q[89] * 1000, "p99": q[98] * 1000}


def summarize(system: str, concurrency: int, samples: list[Sample], seconds: float) -> LevelResult:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.output_tokens for s in ok)
    return LevelResult(
        system, concurrency, len(ok), seconds, tokens, len(samples) - len(ok), len(ok) / seconds, tokens / seconds,
        percentiles([s.ttft for s in ok if s.ttft is not None]), percentiles([x for s in ok for x in s.itls]),
        note=next((s.error for s in samples if s.error), None),
    )  # fmt: skip


# --- HTTP clients -----------------------------------------------------------------------------------


async def http_request(client: httpx.AsyncClient, model: str, req: Request, extra: dict) -> Sample:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    t0 = time.perf_counter()
    ttft, last, itls, chunks, usage = None, None, [], 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(None, [], 0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Sample(None, [], 0, str(data["error"])[:200])
                usage = data.get("usage") or usage
                if not data.get("choices"):
                    continue
                now = time.perf_counter()
                if data["choices"][0].get("text") or not data["choices"][0].get("finish_reason"):
                    chunks += 1
                    if ttft is None:
                        ttft = now - t0
                    else:
                        itls.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        return Sample(None, [], 0, f"{type(e).__name__}: {e}")
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else chunks
    return Sample(ttft, itls, tokens)


async def closed_loop(concurrency: int, requests: list[Request], send) -> tuple[list[Sample], float]:
    queue = list(reversed(requests))
    samples: list[Sample] = []

    async def worker() -> None:
        while queue:
            samples.append(await send(queue.pop()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - t0


async def bench_http(
    system: str, url: str, model: str, levels, requests, extra: dict, warmup: int, level_timeout: float
) -> list:
    results = []
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def send(r: Request) -> Sample:
            return await http_request(client, model, r, extra)

        await closed_loop(min(warmup, len(requests)), requests[:warmup], send)
        for c in levels:
            try:
                samples, seconds = await asyncio.wait_for(
                    closed_loop(c, requests_for(requests, c), send), level_timeout
                )
            except TimeoutError:
                note = f"did not finish {len(requests_for(requests, c))} requests in {level_timeout:.0f} s"
                print(f"  {system} c={c}: {note}", flush=True)
                results += [
                    LevelResult(system, level, 0, 0, 0, 0, 0, 0, note=note) for level in levels[levels.index(c) :]
                ]
                break
            results.append(summarize(system, c, samples, seconds))
            print(f"  {system} c={c}: {results[-1].output_tok_s:.1f} tok/s", flush=True)
    return results


def requests_for(requests: list[Request], concurrency: int) -> list[Request]:
    """At each level: 2 requests per client, at least 4 (the same seeded prompts, cycled)."""
    n = max(4, 2 * concurrency)
    return [requests[i % len(requests)] for i in range(n)]


# --- in-process engine --------------------------------------------------------------------------------


def engine_request(engine, req: Request) -> Sample:
    from backend import SamplingParams

    params = SamplingParams(max_new_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ttft, last, itls, tokens = None, None, [], 0
    try:
        for delta in engine.stream(req.prompt, params):
            now = time.perf_counter()
            if delta.token_ids:
                tokens += len(delta.token_ids)
                if ttft is None:
                    ttft = now - t0
                else:
                    itls.append(now - last)
                last = now
    except Exception as e:
        return Sample(None, [], 0, f"{type(e).__name__}: {e}")
    return Sample(ttft, itls, tokens)


def bench_engine(folder: str, args, levels, requests) -> list[LevelResult]:
    from backend import Engine

    engine = Engine(folder, model_impl="native", dtype=args.dtype, **engine_limits(args))
    results = []
    try:

        async def run_level(c: int, reqs: list[Request]):
            async def send(r: Request) -> Sample:
                return await asyncio.to_thread(engine_request, engine, r)

            return await closed_loop(c, reqs, send)

        asyncio.run(run_level(min(args.warmup, len(requests)), requests[: args.warmup]))
        for c in levels:
            samples, seconds = asyncio.run(run_level(c, requests_for(requests, c)))
            results.append(summarize("engine", c, samples, seconds))
            print(f"  engine c={c}: {results[-1].output_tok_s:.1f} tok/s", flush=True)
    finally:
        engine.close()
    return results


# --- servers as subprocesses ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_limits(args) -> dict:
    return {"max_model_len": args.max_model_len, "max_num_seqs": max(args.concurrency)}


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not healthy after {START_TIMEOUT_S} s: {log.read_text()[-1500:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_command(system: str, folder: str, port: int, args) -> list[str]:
    if system == "hf-serve":
        exe = shutil.which("transformers")
        if exe is None:
            raise RuntimeError("the `transformers` CLI is not on PATH")
        cmd = [exe, "serve", folder, "--host", "127.0.0.1", "--port", str(port), "--continuous-batching",
               "--dtype", args.dtype, "--device", args.device, "--log-level", "warning"]  # fmt: skip
        return cmd
    impl = system.removeprefix("flab-")
    cmd = [sys.executable, "-m", "backend.launch_server", "--model-path", folder, "--model-impl", impl,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--device", args.device,
           "--served-model-name", "bench", "--log-level", "warning"]  # fmt: skip
    for name, value in engine_limits(args).items():
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def bench_server(system: str, folder: str, args, levels, requests, workdir: Path) -> list[LevelResult]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"{system}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as out:
        proc = subprocess.Popen(server_command(system, folder, port, args), cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        wait_healthy(proc, url, log)
        model = folder if system == "hf-serve" else "bench"
        extra = {} if system == "hf-serve" else {"ignore_eos": True}
        return asyncio.run(bench_http(system, url, model, levels, requests, extra, args.warmup, args.level_timeout))
    finally:
        stop(proc)


# --- report --------------------------------------------------------------------------------------------


def table(results: list[LevelResult]) -> str:
    head = "| system | conc. | req/s | output tok/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |"
    rows = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.requests == 0:
            note = " ".join(str(r.note).split())
            rows.append(f"| {r.system} | {r.concurrency} | — | — | failed: {note} | |")
            continue
        t = " / ".join(f"{r.ttft_ms.get(p, float('nan')):.0f}" for p in ("p50", "p90", "p99"))
        i = " / ".join(f"{r.itl_ms.get(p, float('nan')):.1f}" for p in ("p50", "p90", "p99"))
        rows.append(f"| {r.system} | {r.concurrency} | {r.request_throughput:.2f} | {r.output_tok_s:.1f} | {t} | {i} |")
    return "\n".join(rows)


def ratios(results: list[LevelResult]) -> list[str]:
    by = {(r.system, r.concurrency): r.output_tok_s for r in results if r.requests}
    lines = []
    for c in sorted({r.concurrency for r in results}):
        for ours in ("flab-native", "flab-transformers"):
            if (ours, c) not in by:
                continue
            if ("engine", c) in by:
                lines.append(f"c={c}: {ours} / engine = {by[ours, c] / by['engine', c]:.2f}x")
            if ("hf-serve", c) in by:
                lines.append(f"c={c}: {ours} / hf-serve = {by[ours, c] / by['hf-serve', c]:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> list[LevelResult]:
    from backend.core.config import EngineConfig, add_engine_flags  # torch: only when run, not for its client helpers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny:smollm2-135m", help="folder, Hub id, or tiny:<arch>")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--input-words", type=int, default=48, help="words per prompt (seeded, from a fixed corpus)")
    p.add_argument("--output-len", type=int, default=32, help="max_tokens of every request")
    p.add_argument("--num-prompts", type=int, default=64, help="distinct seeded prompts (cycled per level)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring each system")
    p.add_argument(
        "--level-timeout", type=float, default=300, help="seconds one level may take (a server that is slower: noted)"
    )
    add_engine_flags(  # EngineConfig's declarations; the benchmark's own defaults where it has them
        p,
        ["dtype", "device", "max_model_len", "seed"],
        defaults=dict(dtype="bfloat16", device="cpu", seed=EngineConfig.default("seed")),
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if min(args.concurrency) < 1:
        p.error("--concurrency values must be >= 1")
    from backend.tools.bench import resolve_path

    folder = resolve_path(args.model, args.dtype)
    requests = make_requests(args.num_prompts, args.input_words, args.output_len, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="flab-bench-serving-"))  # the servers' logs
    results: list[LevelResult] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for system in args.systems:
        print(f"{system} ...", flush=True)
        try:
            if system == "engine":
                results += bench_engine(folder, args, args.concurrency, requests)
            else:
                results += bench_server(system, folder, args, args.concurrency, requests, workdir)
        except Exception as e:  # one system that cannot run is reported, the others still run
            reason = f"{type(e).__name__}: {str(e)[-300:]}"
            print(f"  {system} could not run: {reason}", flush=True)
            results += [LevelResult(system, c, 0, 0, 0, 0, 0, 0, note=reason) for c in args.concurrency]
    cpu = platform.processor() or platform.machine()
    print(f"\nserver logs in {workdir}")
    print(f"{args.model} ({args.dtype}, {args.device}), {os.cpu_count()} CPUs ({cpu}), {started}")
    print(f"{args.input_words}-word prompts, {args.output_len} output tokens, greedy, streaming /v1/completions\n")
    print(table(results))
    for line in ratios(results):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
