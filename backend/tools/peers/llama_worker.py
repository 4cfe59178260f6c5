"""llama.cpp (through llama-cpp-python) as a peer of backend/tools/bench_peers.py; run with the Python of an
environment that has `llama-cpp-python`. Settings (argv JSON): model (a .gguf), threads, n_ctx, n_batch.

Greedy (temp 0), EOS never checked (the generator yields until stopped), no prefix reuse between requests (the
context is reset first). The batch-1 request runs through `Llama.generate`. llama-cpp-python's high-level API runs
one sequence at a time; the many-request workload runs either one request after another (batching "sequential")
or all of them in shared llama.cpp batches (batching "batched", llama_batched.py: what llama.cpp's server does).
"""

from __future__ import annotations

import time

from llama_batched import BatchedContext
from wire import serve, settings_from_argv


def _without_extra_buffer_types(llama_cpp) -> None:
    """Load models with `use_extra_bufts` off (the high-level API has no argument for it): no weight repacking
    into llama.cpp's extra CPU buffer types, whose AMX path dies with SIGILL on a VM that lists AMX but does not
    enable its tile state."""
    low = llama_cpp.llama_cpp
    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def main() -> None:
    import llama_cpp
    from llama_cpp import Llama

    settings = settings_from_argv()
    threads = int(settings["threads"])
    extra_bufts = bool(settings.get("extra_bufts", False))
    if not extra_bufts:
        _without_extra_buffer_types(llama_cpp)
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

    batching = settings.get("batching", "batched")
    batched = None
    if batching == "batched":
        n_seq = int(settings["max_num_seqs"])
        batched = BatchedContext(llm, int(settings["batched_n_ctx"]), n_seq, int(settings.get("n_batch", 512)), threads)

    def throughput(request: dict) -> dict:
        start = time.perf_counter()
        lens = [int(n) for n in request["max_tokens"]]
        if batched is not None:
            outputs = batched.generate(request["prompts"], lens)
        else:
            outputs = [generate(p, n)[2] for p, n in zip(request["prompts"], lens)]
        return {
            "seconds": time.perf_counter() - start,
            "output_tokens": sum(len(o) for o in outputs),
            "tokens": outputs,
        }

    generate(list(range(10, 26)), 4)  # warm-up
    if batched is not None:
        batched.generate([list(range(10, 26))] * 2, [4, 4])
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
                "use_extra_bufts": extra_bufts,
                "sampling": "greedy (temp 0), EOS not checked",
                "batching": (
                    f"batched: llama_decode over up to {settings.get('max_num_seqs')} sequences ({batched.settings})"
                    if batched is not None
                    else "sequential: one request at a time (the high-level API runs one sequence)"
                ),
                "system_info": system_info.decode() if isinstance(system_info, bytes) else str(system_info),
            },
        },
    )


if __name__ == "__main__":
    main()
