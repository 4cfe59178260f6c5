"""The text of backend/tools/bench_peers.py's report: the machine, the table of medians, settings, every round."""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
from pathlib import Path

from backend.tools.peers.systems import SystemResult
from backend.units import format_bytes

RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def relevant_flags() -> str:
    from flab_kernels.cpu.build import cpu_flags

    flags = cpu_flags()
    if flags is None:
        return "flags unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in RELEVANT_FLAGS)


def machine_lines(
    started: datetime.datetime,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    bandwidth: float,
    args: argparse.Namespace,
    rounds_run: int,
) -> list[str]:
    import os

    load = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
    return [
        f"date: {started:%Y-%m-%d %H:%M} UTC; model {args.model}; {rounds_run} of {args.rounds} rounds, each running "
        f"every system in turn ({', '.join(args.systems)}); medians",
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs; {relevant_flags()}",
        f"load average (1 / 5 / 15 min): {load(load_before)} at the start, {load(load_after)} at the end",
        f"threads: {args.threads} for every system; copy bandwidth {bandwidth / 1e9:.1f} GB/s (median of the rounds; "
        "the decode bound of a system is that over the bytes of weights one decode step streams)",
    ]


def _ratio(value: float, ref: float | None) -> str:
    return f"{value / ref:.2f}x" if ref else "-"


def _same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def markdown_table(results: list[SystemResult], reference: str, args: argparse.Namespace) -> list[str]:
    ref = next((r for r in results if r.spec.name == reference and r.ok), None)
    ref_values = {m: ref.median(m) if ref else None for m in ("decode_tok_s", "prefill_tok_s", "output_tok_s")}
    n = args.num_requests
    lines = [
        f"| system | batch-1 decode tok/s ({args.prompt_len} in / {args.new_tokens} out) | % of the bandwidth bound "
        "(median of the rounds' decode x weight bytes / copy bandwidth; the bytes) "
        f"| {args.prompt_len}-token prefill tok/s | {n} requests, output tok/s | vs {reference}: decode / prefill / "
        f"{n} requests | greedy tokens equal to {reference}'s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.spec.label} (`{r.spec.name}`) | {r.status} | | | | | |")
            continue
        decode, prefill, output = (r.median(m) for m in ("decode_tok_s", "prefill_tok_s", "output_tok_s"))
        # each round's decode against that round's copy bandwidth (the machine's load changes between rounds)
        shares = [x.decode_tok_s * r.weight_bytes / x.bandwidth for x in r.rounds if x.bandwidth and r.weight_bytes]
        share = f"{100 * statistics.median(shares):.0f}% ({format_bytes(r.weight_bytes)})" if shares else "-"
        ratios = " / ".join(_ratio(v, ref_values[m]) for v, m in zip((decode, prefill, output), ref_values))
        same = (
            f"first {_same_prefix(r.rounds[0].latency_tokens, ref.rounds[0].latency_tokens)} of "
            f"{len(ref.rounds[0].latency_tokens)}"
            if ref
            else "-"
        )
        lines.append(
            f"| {r.spec.label} (`{r.spec.name}`) | {decode:.1f} | {share} | {prefill:.0f} | {output:.1f} | {ratios} "
            f"| {same} |"
        )
    return lines


def settings_lines(results: list[SystemResult]) -> list[str]:
    lines = ["Settings:"]
    for r in results:
        if not r.ok:
            continue
        settings = "; ".join(f"{k} {v}" for k, v in r.settings.items() if k != "system_info")
        lines.append(f"- `{r.spec.name}`: {r.version}; {settings}")
        if "system_info" in r.settings:
            lines.append(f"  - llama.cpp system info: {r.settings['system_info'].strip()}")
    return lines


def rounds_lines(results: list[SystemResult]) -> list[str]:
    lines = ["Rounds (batch-1 decode tok/s, prefill tok/s, many-request output tok/s; copy GB/s):"]
    for r in results:
        if not r.rounds:
            continue
        each = ", ".join(
            f"{x.decode_tok_s:.1f} / {x.prefill_tok_s:.0f} / {x.output_tok_s:.1f} ({x.bandwidth / 1e9:.1f})"
            for x in r.rounds
        )
        lines.append(f"- `{r.spec.name}`: {each}")
    return lines
