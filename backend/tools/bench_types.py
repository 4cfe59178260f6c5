"""What every system of backend/tools/bench.py shares: the options it runs under, the workload, its result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BenchOptions:
    """How every system is run (the CLI flags; the app's Benchmark tab fills the same fields)."""

    dtype: str = "bfloat16"
    device: str = "auto"
    quantization: str | None = None  # our engine only: the HF baselines run the checkpoint as it is
    max_model_len: int | None = None
    seed: int = 0
    num_requests: int = 32
    repeat: int = 1
    trust_remote_code: bool = False
    endpoint: str | None = None  # base URL of an OpenAI-compatible server: the "endpoint" system (bench_endpoint.py)
    endpoint_api_key: str | None = None
    tp_size: int = 1  # our engine's tensor-parallel ranks (backend/distributed)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


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
    peak_rss_bytes: int  # the process's peak during this run (model load included)
    cuda_peak_bytes: int = 0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    decode_tok_s: float | None = None
    weight_bandwidth_gbs: float | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    error: str | None = None
    repeat_tok_s: list[float] = field(default_factory=list)  # output tok/s of every repeat (this is the median one)
