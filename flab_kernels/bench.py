"""Benchmark the Triton paged attention against torch SDPA (flash) and FlexAttention: `python -m flab_kernels.bench`.

GPU only (on CPU it says so and exits 0). Decode: one new token per sequence over 1k/8k/32k
contexts, reported as achieved HBM bandwidth (K+V bytes read / time). Prefill: one causal
sequence without prefix, reported as TFLOP/s (4 * L^2 / 2 * Hq * D flops). Baselines run on
contiguous K/V gathered beforehand (the gather is not timed, so they are a best case), with
GQA via `enable_gqa` (no repeated KV). Prints a markdown table; `--json PATH` also writes rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _paged_setup(
    batch: int, ctx: int, new: int, hkv: int, hq: int, d: int, bs: int, dtype: torch.dtype, device: torch.device
) -> dict:
    """Caches holding `ctx` tokens per sequence in shuffled blocks, plus the matching contiguous K/V."""
    blocks_per_seq = -(-ctx // bs)
    nb = batch * blocks_per_seq
    k_cache = torch.randn(nb, bs, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(nb, device=device).view(batch, blocks_per_seq).to(torch.int32)  # (B, MB)
    q = torch.randn(batch * new, hq, d, dtype=dtype, device=device)  # (T, Hq, D)
    qsl = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * new
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    pos = torch.arange(ctx, device=device)
    slots = tables[:, pos // bs].long() * bs + pos % bs  # (B, L)
    k = k_cache.view(nb * bs, hkv, d)[slots].transpose(1, 2).contiguous()  # (B, Hkv, L, D)
    v = v_cache.view(nb * bs, hkv, d)[slots].transpose(1, 2).contiguous()
    q4 = q.view(batch, new, hq, d).transpose(1, 2).contiguous()  # (B, Hq, new, D)
    return dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        qsl=qsl,
        seq_lens=seq_lens,
        tables=tables,
        k=k,
        v=v,
        q4=q4,
        new=new,
        ctx=ctx,
    )


def _time_ms(fn: Callable[[], torch.Tensor]) -> float | None:
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    except Exception as exc:  # a baseline missing on this torch/GPU must not end the run
        print(f"  (skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:100]})", file=sys.stderr)
        return None


def _methods(s: dict, scale: float, causal: bool) -> dict[str, Callable[[], torch.Tensor]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from flab_kernels.ops import attention_kernel_for
    from flab_kernels.paged_attention import paged_attention_triton
    from flab_kernels.paged_decode import paged_decode_triton

    args = (s["q"], s["k_cache"], s["v_cache"], s["qsl"], s["seq_lens"], s["tables"], scale)
    batch, new, ctx = s["seq_lens"].numel(), s["new"], s["ctx"]

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                s["q4"], s["k"], s["v"], is_causal=causal, scale=scale, enable_gqa=True
            )

    methods = {
        "triton_unified": lambda: paged_attention_triton(*args, max_query_len=new, max_seq_len=ctx),
        "sdpa_flash(contig)": sdpa,
    }
    try:
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, new, ctx, device=s["q"].device)
        flex = torch.compile(flex_attention, dynamic=False)
        methods["flex(contig)"] = lambda: flex(
            s["q4"], s["k"], s["v"], block_mask=block_mask, scale=scale, enable_gqa=True
        )
    except Exception as exc:  # FlexAttention unavailable on this torch/GPU
        print(f"  (flex skipped: {type(exc).__name__}: {exc})", file=sys.stderr)
    if new == 1:
        choice = attention_kernel_for(batch, batch, s["k_cache"].shape[2], ctx, s["q"].device, max_query_len=1)
        splits = choice.num_splits if choice.num_splits > 1 else 8
        methods[f"triton_split_kv({splits})"] = lambda: paged_decode_triton(*args, num_splits=splits)
        methods[f"auto->{choice.kernel}"] = (
            methods["triton_unified"] if choice.kernel == "unified" else methods[f"triton_split_kv({splits})"]
        )
    return methods


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    hq, hkv, d, bs = args.q_heads, args.kv_heads, args.head_dim, args.block_size
    scale = d**-0.5
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[dict] = []
    for batch in args.decode_batches:
        for ctx in args.decode_contexts:
            s = _paged_setup(batch, ctx, 1, hkv, hq, d, bs, dtype, device)
            kv_bytes = 2 * batch * ctx * hkv * d * elem
            ref = None
            for name, fn in _methods(s, scale, causal=False).items():
                ms = _time_ms(fn)
                out = fn().reshape(batch, hq, d) if ms is not None else None
                if name == "sdpa_flash(contig)" and out is not None:
                    ref = out
                rows.append(
                    dict(
                        phase="decode",
                        method=name,
                        batch=batch,
                        context=ctx,
                        ms=ms,
                        gb_s=None if ms is None else kv_bytes / ms / 1e6,
                        tflops=None,
                        out=out,
                    )
                )
            for r in rows:
                if r["phase"] == "decode" and r["batch"] == batch and r["context"] == ctx and "max_err" not in r:
                    o = r.pop("out")
                    r["max_err"] = None if o is None or ref is None else float((o.float() - ref.float()).abs().max())
            del s
    for length in args.prefill_lengths:
        s = _paged_setup(1, length, length, hkv, hq, d, bs, dtype, device)
        flops = 4 * length * length / 2 * hq * d
        for name, fn in _methods(s, scale, causal=True).items():
            ms = _time_ms(fn)
            rows.append(
                dict(
                    phase="prefill",
                    method=name,
                    batch=1,
                    context=length,
                    ms=ms,
                    gb_s=None,
                    tflops=None if ms is None else flops / ms / 1e9,
                    max_err=None,
                )
            )
        del s
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| phase | method | batch | context | ms | GB/s | TFLOP/s | max err vs sdpa |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['method']} | {r['batch']} | {r['context']} | {_fmt(r['ms'], '.3f')} | "
            f"{_fmt(r['gb_s'], '.0f')} | {_fmt(r['tflops'], '.1f')} | {_fmt(r.get('max_err'), '.1e')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("flab_kernels.bench needs a CUDA GPU (the Triton kernels only run compiled there); nothing to do on CPU.")
        return 0
    rows = run(args)
    props = torch.cuda.get_device_properties(0)
    header = (
        f"GPU: {props.name}, torch {torch.__version__}, {args.dtype}, Hq={args.q_heads} Hkv={args.kv_heads} "
        f"D={args.head_dim} block={args.block_size}"
    )
    print(markdown(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
