"""Per-step time at tp_size 1 and N, with the communication share of the step (rank 0's time inside
collectives, which includes waiting there for the slowest rank).

    python -m backend.distributed.bench --model tiny:qwen3-0.6b --tp 1 2 --batch 1 8

For each tp_size and batch size: B requests of `--prompt-len` random tokens, `--new-tokens` each, stepped by hand
(no background loop); the prefill step(s) and the decode steps are timed separately (median over the decode
steps). tp_size 1 is the plain engine with `--threads` threads; tp_size N gives each of its N ranks threads / N.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from backend import Engine, SamplingParams
from backend.core.config import MODEL_IMPLS
from backend.distributed.group import TPOptions
from backend.distributed.testing import make_tp_engine


@dataclass
class StepRow:
    tp_size: int
    impl: str
    batch: int
    phase: str  # "prefill" | "decode"
    steps: int
    step_ms: float  # median wall time of one engine step
    comm_ms: float  # median time inside collectives on rank 0 in that step
    comm_calls: int  # collectives per step (median)

    @property
    def comm_share(self) -> float:
        return self.comm_ms / self.step_ms if self.step_ms else 0.0


def run_one(
    engine: Engine, batch: int, prompt_len: int, new_tokens: int, seed: int
) -> list[tuple[str, float, float, int]]:
    rng = random.Random(seed)
    vocab = engine.vocab_size
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(prompt_token_ids=[rng.randrange(vocab) for _ in range(prompt_len)], params=params)
    take = getattr(engine.runner, "take_comm_seconds", lambda: (0.0, 0))
    take()
    steps = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        comm, calls = take()
        last = engine.step_history()[-1]
        steps.append(("prefill" if last.prefill_tokens else "decode", dt, comm, calls))
    return steps


def summarize(tp: int, impl: str, batch: int, steps) -> list[StepRow]:
    rows = []
    for phase in ("prefill", "decode"):
        mine = [s for s in steps if s[0] == phase]
        if not mine:
            continue
        rows.append(
            StepRow(
                tp,
                impl,
                batch,
                phase,
                len(mine),
                statistics.median(s[1] for s in mine) * 1e3,
                statistics.median(s[2] for s in mine) * 1e3,
                int(statistics.median(s[3] for s in mine)),
            )
        )
    return rows


def make_engine(model: str, tp: int, impl: str, dtype: str, blocks: int, max_len: int, threads: int) -> Engine:
    options = dict(model_impl=impl, dtype=dtype, device="cpu", num_kv_blocks=blocks, max_model_len=max_len)
    if tp == 1:
        return Engine(model, **options)
    return make_tp_engine(model, tp_options=TPOptions(tp, threads_per_rank=max(1, threads // tp)), **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:qwen3-0.6b")
    parser.add_argument("--impl", nargs="+", default=["native"], choices=[i for i in MODEL_IMPLS if i != "auto"])
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in all")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_len = args.prompt_len + args.new_tokens + 16
    blocks = max(args.batch) * -(-max_len // 16) + 16
    rows: list[StepRow] = []
    for impl in args.impl:
        for tp in args.tp:
            engine = make_engine(args.model, tp, impl, args.dtype, blocks, max_len, args.threads)
            try:
                run_one(engine, 1, args.prompt_len, 4, args.seed)  # warm-up
                for batch in args.batch:
                    rows += summarize(
                        tp, impl, batch, run_one(engine, batch, args.prompt_len, args.new_tokens, args.seed)
                    )
            finally:
                engine.close()
    print(
        f"{args.model}, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
        f"{platform.processor() or platform.machine()}, {args.threads} threads in all, torch {torch.__version__}"
    )
    print("| impl | tp_size | batch | phase | step ms | collectives ms | share | collectives/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.impl} | {r.tp_size} | {r.batch} | {r.phase} | {r.step_ms:.1f} | {r.comm_ms:.1f} | "
            f"{100 * r.comm_share:.0f}% | {r.comm_calls} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump([dict(asdict(r), comm_share=r.comm_share) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
