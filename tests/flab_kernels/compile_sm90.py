"""Compile every Triton kernel for an sm_90 (H100/H200) target without a GPU:
`python -m tests.flab_kernels.compile_sm90`.

The interpreter runs kernels as numpy and accepts code that the real compiler rejects (loop-carried
type changes, dot shapes under 16, unsupported ops). This builds TTIR -> PTX -> cubin with the
ptxas bundled in the triton wheel, so those errors show on a CPU-only machine. Must run without
TRITON_INTERPRET (test_compile_sm90 starts it in a subprocess). Prints one line per variant.
"""

from __future__ import annotations

import os
import sys
import time

import torch

TYPES = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


def compile_kernel(kernel, args: dict, num_warps: int = 4):  # -> CompiledKernel
    """Compile `kernel` for sm_90: pointer args given as torch dtypes, scalars as python values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts = {}, {}
    for name, param in zip(kernel.arg_names, kernel.params):
        value = args[name]
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.dtype):
            sig[name] = TYPES[value]
        elif isinstance(value, int):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return triton.compile(
        ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)
    )


def _attention_variants():
    from flab_kernels.paged_attention import _unified_attention_kernel, unified_launch_config
    from flab_kernels.paged_decode import _merge_splits_kernel, _split_kv_decode_kernel, split_kv_launch_config

    i32 = torch.int32
    strides = {
        n: 3
        for n in (
            "stride_qt",
            "stride_qh",
            "stride_ot",
            "stride_oh",
            "stride_cb",
            "stride_cs",
            "stride_ch",
            "stride_bt",
            "stride_ps",
            "stride_ph",
            "stride_pp",
        )
    }
    for dtype, max_q, group, head_dim, block_size, feats in [
        (torch.bfloat16, 1, 4, 128, 16, (False, False, False)),
        (torch.bfloat16, 64, 4, 128, 16, (True, True, True)),
        (torch.float16, 64, 1, 80, 32, (False, True, False)),
        (torch.bfloat16, 64, 2, 256, 16, (True, False, True)),
        (torch.float32, 64, 8, 64, 16, (False, False, False)),
        (torch.bfloat16, 64, 7, 64, 16, (False, False, False)),  # Qwen2-style 14/2 heads
    ]:
        cfg = unified_launch_config(max_q, group, head_dim, dtype)
        num_warps = cfg.pop("num_warps")
        args = dict(
            q_ptr=dtype,
            k_cache_ptr=dtype,
            v_cache_ptr=dtype,
            out_ptr=dtype,
            sinks_ptr=torch.float32,
            qsl_ptr=i32,
            seq_lens_ptr=i32,
            block_tables_ptr=i32,
            num_seqs=5,
            scale=0.1,
            softcap=1.0,
            window=7,
            BLOCK_SIZE=block_size,
            NUM_Q_PER_KV=group,
            HEAD_DIM=head_dim,
            USE_SOFTCAP=feats[0],
            USE_WINDOW=feats[1],
            USE_SINKS=feats[2],
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            **strides,
            **cfg,
        )
        yield (
            f"unified {dtype} q{max_q} G{group} D{head_dim} BS{block_size} {feats}",
            _unified_attention_kernel,
            args,
            num_warps,
        )
    for dtype, group, head_dim, feats in [
        (torch.bfloat16, 8, 128, (False, False)),
        (torch.float16, 4, 256, (True, True)),
        (torch.float32, 1, 64, (False, False)),
    ]:
        cfg = split_kv_launch_config(group, head_dim, dtype)
        num_warps, block_d = cfg.pop("num_warps"), cfg["BLOCK_D"]
        args = dict(
            q_ptr=dtype,
            k_cache_ptr=dtype,
            v_cache_ptr=dtype,
            part_out_ptr=torch.float32,
            part_lse_ptr=torch.float32,
            qsl_ptr=i32,
            seq_lens_ptr=i32,
            block_tables_ptr=i32,
            scale=0.1,
            softcap=1.0,
            window=7,
            BLOCK_SIZE=16,
            NUM_Q_PER_KV=group,
            HEAD_DIM=head_dim,
            NUM_SPLITS=8,
            USE_SOFTCAP=feats[0],
            USE_WINDOW=feats[1],
            DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            **strides,
            **cfg,
        )
        yield f"split_kv {dtype} G{group} D{head_dim} {feats}", _split_kv_decode_kernel, args, num_warps
        args = dict(
            part_out_ptr=torch.float32,
            part_lse_ptr=torch.float32,
            out_ptr=dtype,
            sinks_ptr=torch.float32,
            qsl_ptr=i32,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=8,
            SPLITS_PAD=8,
            USE_SINKS=feats[1],
            **strides,
        )
        yield f"merge {dtype} D{head_dim}", _merge_splits_kernel, args, 4


def _small_variants():
    from flab_kernels.activation import _act_and_mul_kernel
    from flab_kernels.kv_store import _store_kv_kernel
    from flab_kernels.norm import _rms_norm_kernel
    from flab_kernels.rotary import _rotary_kernel

    for dtype in (torch.bfloat16, torch.float32):
        yield (
            f"store_kv {dtype}",
            _store_kv_kernel,
            dict(
                key_ptr=dtype,
                value_ptr=dtype,
                k_cache_ptr=dtype,
                v_cache_ptr=dtype,
                slot_ptr=torch.int64,
                stride_kt=3,
                stride_kh=3,
                stride_vt=3,
                stride_vh=3,
                stride_cb=3,
                stride_cs=3,
                stride_ch=3,
                block_size=3,
                HEAD_DIM=80,
                BLOCK_D=128,
            ),
            4,
        )
        for residual, gemma in ((False, False), (True, True)):
            yield (
                f"rms_norm {dtype} res={residual} gemma={gemma}",
                _rms_norm_kernel,
                dict(
                    x_ptr=dtype,
                    res_ptr=dtype,
                    w_ptr=dtype,
                    out_ptr=dtype,
                    res_out_ptr=dtype,
                    stride_x=3,
                    stride_r=3,
                    stride_o=3,
                    stride_ro=3,
                    hidden=3,
                    eps=1e-6,
                    offset=1.0,
                    HAS_RESIDUAL=residual,
                    GEMMA=gemma,
                    BLOCK=4096,
                ),
                16,
            )
        for neox, tail in ((True, False), (False, True)):
            yield (
                f"rotary {dtype} neox={neox} tail={tail}",
                _rotary_kernel,
                dict(
                    x_ptr=dtype,
                    out_ptr=dtype,
                    pos_ptr=torch.int64,
                    cache_ptr=torch.float32,
                    stride_xt=3,
                    stride_xh=3,
                    stride_ot=3,
                    stride_oh=3,
                    stride_cache=3,
                    num_heads=3,
                    HEAD_DIM=80,
                    HALF=20,
                    BLOCK_H=32,
                    BLOCK_HALF=32,
                    IS_NEOX=neox,
                    COPY_TAIL=tail,
                    BLOCK_TAIL=64,
                ),
                4,
            )
        for act in (0, 1, 2):
            yield (
                f"act_and_mul {dtype} act={act}",
                _act_and_mul_kernel,
                dict(x_ptr=dtype, out_ptr=dtype, stride_x=3, stride_o=3, inter=3, ACT=act, BLOCK=1024),
                4,
            )


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1 (the interpreter has no compiler)")
        return 2
    failures = 0
    for name, kernel, args, num_warps in [*_attention_variants(), *_small_variants()]:
        start = time.perf_counter()
        try:
            compiled = compile_kernel(kernel, args, num_warps)
            print(f"ok   {name}: {time.perf_counter() - start:.1f}s, smem {compiled.metadata.shared} B")
        except Exception as exc:  # report every failing variant, not only the first
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
