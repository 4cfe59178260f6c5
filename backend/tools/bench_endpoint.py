"""The `endpoint` system of backend/tools/bench.py: the same seeded workload sent to a running OpenAI-compatible
server (`--endpoint URL`, e.g. vLLM, SGLang, `transformers serve`, this project's launch_server) through
backend/remote.py: every request at once, streamed, temperature 0, EOS ignored (the vLLM / SGLang extension),
so each produces its output length. Token counts come from the stream (logprobs tokens, then usage); the server's
memory is not this process's, so the peak-RSS column is 0 for it."""

from __future__ import annotations

import time

from backend.core.sampling import SamplingParams
from backend.remote import RemoteEndpoint
from backend.tools.bench_types import BenchOptions, Result, Workload


def run_endpoint(path: str, wl: Workload, opts: BenchOptions) -> Result:
    endpoint = RemoteEndpoint(opts.endpoint, opts.endpoint_api_key)
    endpoint.resolve_model()
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in wl.output_lens]
    endpoint.generate(
        prompt_token_ids=[wl.prompts[0][:8]], sampling_params=SamplingParams(max_new_tokens=2, ignore_eos=True)
    )
    t = time.perf_counter()
    outs = endpoint.generate(prompt_token_ids=wl.prompts, sampling_params=params)
    seconds = time.perf_counter() - t
    out_tokens = sum(min(count, n) for (_, count), n in zip(outs, wl.output_lens))
    in_tokens = sum(len(p) for p in wl.prompts)
    res = Result(
        "endpoint", wl.name, seconds, out_tokens, in_tokens, out_tokens / seconds, (out_tokens + in_tokens) / seconds, 0
    )
    if wl.name == "latency":
        out, count = outs[0]
        if out.ttft is not None and count > 1:
            res.ttft_ms = out.ttft * 1000
            res.tpot_ms = (out.latency - out.ttft) / (count - 1) * 1000
            res.decode_tok_s = 1000 / res.tpot_ms
    return res
