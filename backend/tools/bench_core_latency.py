"""How long callers wait on a busy engine, and how long its steps take: the engine core's own measurements.

    python -m backend.tools.bench_core_latency latency --model tiny:smollm2-135m --prompt-len 1024
    python -m backend.tools.bench_core_latency steps --model tiny:smollm2-135m

`latency`: one long step (a single prefill of `--prompt-len` tokens) runs on a thread of its own; from the moment its
batch is scheduled (`step(on_batch=...)`) until it ends, the main thread times `stats()`, `kv_cache_view()`,
`num_requests` and `abort()` (of requests waiting behind it: `max_num_seqs=1`) over and over. Only calls that ended
before the step did are counted, so each one overlapped the forward. Prints the step's duration and per call the
median and the worst, in milliseconds.

`steps`: the batch-1 decode step (one request, a 128-token prompt, median step time over `--decode-steps` decode
steps, 64) and the throughput step (32 requests of 64-token prompts decoding together for half as many steps: median
step time while all 32 decode, and the output tokens per second of those steps). Public API only, so the same file
runs against an older checkout for an A/B (copy it there and run both in turn).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import torch

from backend import Engine, SamplingParams


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab - 10) for _ in range(n)]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def measure_latency(path: str, dtype: str, prompt_len: int, waiting: int) -> dict:
    engine = Engine(
        path,
        dtype=dtype,
        max_num_seqs=1,
        max_num_batched_tokens=prompt_len,
        max_model_len=prompt_len + 16,
        num_kv_blocks=-(-(prompt_len + 16) // 16) + 4 * waiting + 8,  # the long prompt, the waiting ones, the warm-up
    )
    try:
        rng = random.Random(0)
        vocab = engine.vocab_size
        params = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)
        engine.generate(prompt_token_ids=[_ids(rng, 64, vocab)], sampling_params=params)  # warm-up
        long_id = engine.add_request(prompt_token_ids=_ids(rng, prompt_len, vocab), params=params)
        queued = [engine.add_request(prompt_token_ids=_ids(rng, 32, vocab), params=params) for _ in range(waiting)]
        started, ended = threading.Event(), threading.Event()
        step_s: list[float] = []

        def run_step() -> None:
            t = time.perf_counter()
            engine.step(on_batch=lambda batch: started.set())
            step_s.append(time.perf_counter() - t)
            ended.set()

        stepper = threading.Thread(target=run_step)
        stepper.start()
        started.wait()
        calls: dict[str, list[float]] = {"stats()": [], "kv_cache_view()": [], "num_requests": [], "abort()": []}
        done: dict[str, list[float]] = {k: [] for k in calls}
        while not ended.is_set():
            for name, fn in (
                ("stats()", engine.stats),
                ("kv_cache_view()", engine.kv_cache_view),
                ("num_requests", lambda: engine.num_requests),
            ):
                calls[name].append(_timed(fn))
            if queued:
                calls["abort()"].append(_timed(lambda: engine.abort(queued.pop())))
            if not ended.is_set():  # every call of this round ended before the step did
                for k, v in calls.items():
                    done[k].extend(v)
            for v in calls.values():
                v.clear()
            time.sleep(0.001)
        stepper.join()
        assert engine.stats().num_steps >= 2, "the long step did not run"
        engine.abort(long_id)
        return {
            "step_ms": step_s[0] * 1000,
            "prompt_len": prompt_len,
            "calls": {
                k: {"n": len(v), "median_ms": statistics.median(v), "max_ms": max(v)} for k, v in done.items() if v
            },
        }
    finally:
        engine.close()


def measure_steps(path: str, dtype: str, num_requests: int, decode_steps_n: int = 64) -> dict:
    engine = Engine(path, dtype=dtype, max_num_seqs=max(num_requests, 1), num_kv_blocks=2048)
    try:
        rng = random.Random(0)
        vocab = engine.vocab_size
        warm = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        engine.generate(prompt_token_ids=[_ids(rng, 64, vocab)], sampling_params=warm)

        def decode_steps(n_req: int, prompt: int, new: int) -> list[tuple[float, int]]:
            """(step seconds, tokens sampled) of the steps where all n_req requests decode."""
            params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
            for _ in range(n_req):
                engine.add_request(prompt_token_ids=_ids(rng, prompt, vocab), params=params)
            out = []
            while engine.has_unfinished():
                t = time.perf_counter()
                deltas = engine.step()
                dt = time.perf_counter() - t
                last = engine.stats().last_step
                if last is not None and last.prefill_tokens == 0 and last.batch_size == n_req:
                    out.append((dt, len(deltas)))
            return out

        one = decode_steps(1, 128, decode_steps_n + 1)
        many = decode_steps(num_requests, 64, decode_steps_n // 2 + 1)
        return {
            "batch1_decode_step_ms": statistics.median(s for s, _ in one) * 1000,
            f"batch{num_requests}_decode_step_ms": statistics.median(s for s, _ in many) * 1000,
            f"batch{num_requests}_output_tok_s": sum(n for _, n in many) / sum(s for s, _ in many),
        }
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("latency", "steps"))
    parser.add_argument("--model", default="tiny:smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=1024, help="latency: the long step's prefill tokens")
    parser.add_argument("--waiting", type=int, default=64, help="latency: requests queued behind it, to abort")
    parser.add_argument("--num-requests", type=int, default=32, help="steps: the throughput batch")
    parser.add_argument("--decode-steps", type=int, default=64, help="steps: batch-1 decode steps (half at batch N)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from backend.tools.bench import resolve_path

    path = resolve_path(args.model, args.dtype)
    if args.what == "latency":
        result = measure_latency(path, args.dtype, args.prompt_len, args.waiting)
    else:
        result = measure_steps(path, args.dtype, args.num_requests, args.decode_steps)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
