"""llama.cpp (through llama-cpp-python) as a peer of backend/tools/bench_peers.py; run with the Python of an
environment that has `llama-cpp-python`. Settings (argv JSON): model (a .gguf), threads, n_ctx, n_batch.

Greedy (temp 0), EOS never checked (the generator yields until stopped), no prefix reuse between requests (the
context is reset first). llama-cpp-python's API runs one sequence at a time, so the many-request workload runs
the requests one after another.
"""

from __future__ import annotations

import time

from wire import serve, settings_from_argv


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    settings = settings_from_argv()
    threads = int(settings["threads"])
    llm = Llama(
        model_path=settings["model"],
        n_ctx=int(settings.get("n_ctx", 1024)),
        n_batch=int(settings.get("n_batch", 512)),
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )

    def generate(prompt: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
        llm.reset()  # no prefix of the previous request is reused
        tokens: list[int] = []
        start = time.perf_counter()
        first = 0.0
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if not tokens:
                first = time.perf_counter() - start
            tokens.append(int(token))
            if len(tokens) >= max_tokens:
                break
        return first, time.perf_counter() - start, tokens

    def latency(request: dict) -> dict:
        ttft, total, tokens = generate(request["prompt"], int(request["max_tokens"]))
        return {"ttft_s": ttft, "total_s": total, "tokens": tokens}

    def throughput(request: dict) -> dict:
        start = time.perf_counter()
        outputs = [generate(p, int(n))[2] for p, n in zip(request["prompts"], request["max_tokens"])]
        return {
            "seconds": time.perf_counter() - start,
            "output_tokens": sum(len(o) for o in outputs),
            "tokens": outputs,
        }

    generate(list(range(10, 26)), 4)  # warm-up
    system_info = llama_cpp.llama_print_system_info()
    serve(
        {"latency": latency, "throughput": throughput},
        {
            "version": f"llama-cpp-python {llama_cpp.__version__}",
            "settings": {
                "n_threads": threads,
                "n_threads_batch": threads,
                "n_ctx": llm.n_ctx(),
                "n_batch": llm.n_batch,
                "sampling": "greedy (temp 0), EOS not checked",
                "batching": "none: one request at a time (the Python API runs one sequence)",
                "system_info": system_info.decode() if isinstance(system_info, bytes) else str(system_info),
            },
        },
    )


if __name__ == "__main__":
    main()
