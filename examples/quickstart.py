"""Quickstart: load a model, generate a batch, stream one answer, read the engine's stats.

    python examples/quickstart.py                      # SmolLM2-135M-Instruct (offline: converted from a GGUF)
    python examples/quickstart.py --model tiny:llama   # any model name the engine accepts

Runs from the repository root or from examples/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run from anywhere

from backend import Engine, SamplingParams  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?"]


def chat_prompt(engine: Engine, question: str) -> str:
    """The question in the model's chat template (an instruct model answers best in its own format)."""
    messages = [{"role": "user", "content": question}]
    return engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Hub id, folder or built-in model name")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    with Engine(args.model) as engine:
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s: {engine.model_impl} implementation")

        # 1. a batch: all prompts run together (continuous batching), greedy decoding
        greedy = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
        prompts = [chat_prompt(engine, q) for q in QUESTIONS]
        t0 = time.perf_counter()
        outputs = engine.generate(prompts, greedy)
        print(f"\n== generate: {len(outputs)} prompts in {time.perf_counter() - t0:.1f} s")
        for question, out in zip(QUESTIONS, outputs):
            print(f"Q: {question}\nA: {out.text.strip()!r}  ({len(out.token_ids)} tokens, {out.finish_reason})")

        # 2. a stream: text arrives one delta per engine step
        print("\n== stream:")
        pieces = 0
        for delta in engine.stream(chat_prompt(engine, "Write one sentence about the sea."), greedy):
            print(delta.text, end="", flush=True)
            pieces += 1
        print(f"\n({pieces} deltas)")

        # 3. the engine's counters
        stats = engine.stats()
        print("\n== stats:")
        print(f"steps {stats.num_steps}, prompt tokens {stats.prompt_tokens}, generated {stats.generation_tokens}")
        print(f"finished {stats.finished}, preemptions {stats.num_preemptions}")
        print(
            f"KV blocks {stats.kv_blocks_used}/{stats.kv_blocks_total} used, {stats.kv_blocks_cached} cached "
            f"(block size {stats.block_size}), prefix hit rate {stats.prefix_hit_rate:.0%}"
        )


if __name__ == "__main__":
    main()
