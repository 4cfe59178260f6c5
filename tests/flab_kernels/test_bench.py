"""flab_kernels.bench: exits 0 on CPU; the table formatter."""

from __future__ import annotations

import pytest
import torch

from flab_kernels import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_cpu_exits_zero(capsys):
    assert bench.main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_markdown_table():
    rows = [
        dict(
            phase="decode",
            method="triton_unified",
            batch=1,
            context=1024,
            ms=0.05,
            gb_s=83.9,
            tflops=None,
            max_err=1e-3,
        ),
        dict(phase="prefill", method="flex(contig)", batch=1, context=1024, ms=None, gb_s=None, tflops=None),
    ]
    text = bench.markdown(rows, "GPU: test")
    assert "| decode | triton_unified | 1 | 1024 | 0.050 | 84 | n/a | 1.0e-03 |" in text
    assert "| prefill | flex(contig) | 1 | 1024 | n/a | n/a | n/a | n/a |" in text


def test_contiguous_baseline_inputs_match_the_paged_cache():
    # the SDPA/Flex baselines read K/V gathered from the paged cache: same attention as the paged kernel
    from flab_kernels.paged_attention import paged_attention_triton

    s = bench._paged_setup(
        batch=2, ctx=40, new=1, hkv=2, hq=4, d=16, bs=16, dtype=torch.float32, device=torch.device("cpu")
    )
    ref = torch.nn.functional.scaled_dot_product_attention(s["q4"], s["k"], s["v"], scale=0.25, enable_gqa=True)
    out = paged_attention_triton(s["q"], s["k_cache"], s["v_cache"], s["qsl"], s["seq_lens"], s["tables"], 0.25)
    torch.testing.assert_close(out, ref.reshape(2, 4, 16), atol=2e-5, rtol=0)
