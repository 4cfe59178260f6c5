"""Native vs transformers: the same prompts through both implementations, tokens and speed side by side.

    python examples/compare_impls.py                      # SmolLM2-135M-Instruct, fp32, greedy
    python examples/compare_impls.py --model tiny:qwen3 --max-new-tokens 8

`native` is the engine's own model code (fused projections); `transformers` is the transformers model with the
engine's paged attention injected through AttentionInterface. Both share the KV cache, scheduler and sampler,
so in fp32 greedy decoding they must produce the same tokens. Runs from the repository root or from examples/.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run from anywhere

from backend import Engine, SamplingParams  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "A paged KV cache splits memory into"]
IMPLS = ("native", "transformers")


@dataclass
class Run:
    impl: str
    load_s: float
    generate_s: float
    token_ids: list[list[int]]
    texts: list[str]
    model_class: str

    @property
    def tokens_per_s(self) -> float:
        return sum(len(t) for t in self.token_ids) / self.generate_s if self.generate_s else 0.0


def run(model: str, impl: str, dtype: str, params: SamplingParams) -> Run:
    t0 = time.perf_counter()
    with Engine(model, model_impl=impl, dtype=dtype) as engine:
        load_s = time.perf_counter() - t0
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2, temperature=0.0))  # warm-up (first-call costs)
        t0 = time.perf_counter()
        outs = engine.generate(PROMPTS, params)
        generate_s = time.perf_counter() - t0
        model_class = engine.describe()["model_class"]
    return Run(impl, load_s, generate_s, [o.token_ids for o in outs], [o.text for o in outs], model_class)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Hub id, folder or built-in model name")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", help="float32 makes the two token-for-token comparable")
    args = parser.parse_args(argv)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, ignore_eos=True)

    runs = [run(args.model, impl, args.dtype, params) for impl in IMPLS]
    native, hf = runs
    for r in runs:
        print(f"{r.impl:>12}: {r.model_class}")
    print()
    for i, prompt in enumerate(PROMPTS):
        same = native.token_ids[i] == hf.token_ids[i]
        print(f"prompt {prompt!r}: {'same tokens' if same else 'DIFFERENT tokens'}")
        for r in runs:
            print(f"{r.impl:>12}: {r.token_ids[i]}  {r.texts[i]!r}")
    print()
    print(f"{'':>12}  {'load s':>8}  {'generate s':>10}  {'tokens/s':>8}")
    for r in runs:
        print(f"{r.impl:>12}  {r.load_s:8.2f}  {r.generate_s:10.2f}  {r.tokens_per_s:8.1f}")
    n_same = sum(a == b for a, b in zip(native.token_ids, hf.token_ids))
    print(f"\n{n_same}/{len(PROMPTS)} prompts gave identical greedy tokens")
    if n_same != len(PROMPTS):
        sys.exit(1)


if __name__ == "__main__":
    main()
