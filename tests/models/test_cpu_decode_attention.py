"""Our C++ paged decode kernel inside the torch attention backend (backend/layers/attention_backends.py), which
serves both implementations: the transformers fallback reaches it through the injected attention function.

The backend alone (fast): a decode-only step runs the kernel and stores K/V in one call, with the torch path's
results; a step with prefill runs its decode rows on the kernel and its prefills on the planned torch path;
decode-only steps with bidirectional spans and K / V head sizes it does not take run the planned torch path.
The engine: greedy tokens of the transformers implementation with `cpu_kernels="fused"` equal the torch path's
(fp32 exactly; bf16 as tests/models/test_cpu_kernels_engine.py), and its decode steps called the kernel."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from backend import Engine, SamplingParams
from backend.layers.attention_backends import TorchAttention
from backend.paths import cache_dir
from flab_kernels.attention_args import BidirectionalSpan, PagedAttentionArgs
from flab_kernels.cpu import build
from tests.flab_kernels.helpers import make_paged_batch

pytestmark = pytest.mark.skipif(
    not build.supported_isas(build.cpu_flags()), reason="the C++ CPU kernels need x86 with AVX2 + FMA"
)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9] * 7, [11]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


class CountingKernels:
    """The loaded kernel module with its `paged_decode` and `store_kv` calls counted (the rest passed through)."""

    def __init__(self, ext: ModuleType) -> None:
        self.ext = ext
        self.calls = {"paged_decode": 0, "store_kv": 0}

    def __getattr__(self, name: str):
        fn = getattr(self.ext, name)
        if name not in self.calls:
            return fn

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    kernels = build.cpu_kernels(cache_dir())
    if not kernels.available:
        pytest.fail(f"the C++ CPU kernels did not load: {kernels.reason}")
    return kernels.module


def _step(backend: TorchAttention, batch, new_k, new_v, scale=0.25, **options):
    """Store the step's new K/V into copies of the caches, then attend: (output, k cache, v cache)."""
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    qsl = batch.query_start_loc.tolist()
    metadata = backend.prepare(qsl, batch.seq_lens.tolist(), batch.block_tables, k_cache.shape[1])
    backend.store(new_k, new_v, k_cache, v_cache, batch.slot_mapping)
    args = PagedAttentionArgs(
        batch.q, k_cache, v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, scale,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, **options,
    )  # fmt: skip
    return backend.attend(args, metadata), k_cache, v_cache


def _new_kv(t: int, hkv: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, Hkv, D) as the injected attention gets them from HF: views of (Hkv, T, D) tensors."""
    gen = torch.Generator().manual_seed(t * 31 + d)
    k = torch.randn(hkv, t, d, generator=gen).to(dtype).transpose(0, 1)
    v = torch.randn(hkv, t, d, generator=gen).to(dtype).transpose(0, 1)
    return k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"softcap": 5.0, "sliding_window": 6}, {"sinks": "per head"}])
def test_a_decode_step_runs_the_kernel_with_the_torch_results(ext, dtype, options):
    hq, hkv, d = 4, 2, 16
    batch = make_paged_batch([1, 1, 1], [5, 20, 33], hq, hkv, d, 16, dtype, seed=3)
    if options.get("sinks"):
        options = {"sinks": torch.randn(hq, generator=torch.Generator().manual_seed(5))}
    for t, k_v in ((3, _new_kv(3, hkv, d, dtype)), (1, _new_kv(1, hkv, d, dtype))):
        if t == 1:  # one sequence: the HF views are rows, stored in one call
            batch = make_paged_batch([1], [40], hq, hkv, d, 16, dtype, seed=4)
        kernels = CountingKernels(ext)
        out, k_cache, v_cache = _step(TorchAttention(cpu_kernels=kernels), batch, *k_v, **options)
        ref, k_ref, v_ref = _step(TorchAttention(), batch, *k_v, **options)
        assert kernels.calls["paged_decode"] == 1
        assert kernels.calls["store_kv"] == (1 if t == 1 else 0)  # (T, Hkv, D) views of (Hkv, T, D): torch's copy
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        tol = 2**-6 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"softcap": 5.0, "sliding_window": 6}, {"span": True}])
def test_a_step_with_prefill_runs_its_decode_rows_on_the_kernel(ext, dtype, options):
    """Prefills (one with a cached prefix) between decode rows: the prefills on the planned torch path (with their
    bidirectional span), the decode rows in one kernel call; the torch path's output and caches."""
    hq, hkv, d = 4, 2, 16
    kernels = CountingKernels(ext)
    mixed = make_paged_batch([1, 3, 1, 5, 1], [9, 4, 17, 0, 40], hq, hkv, d, 16, dtype, seed=6)
    t = 11
    rows = torch.randn(t, hkv * d).to(dtype).view(t, hkv, d), torch.randn(t, hkv * d).to(dtype).view(t, hkv, d)
    if options.pop("span", False):
        options = {"bidirectional": (BidirectionalSpan(3, 1, 4),)}  # tokens 1-3 of the 5-token prefill
    out, k_cache, v_cache = _step(TorchAttention(cpu_kernels=kernels), mixed, *rows, **options)
    ref, k_ref, v_ref = _step(TorchAttention(), mixed, *rows, **options)
    assert kernels.calls == {"paged_decode": 1, "store_kv": 1}  # rows stored in one call on every step
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    tol = 2**-6 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    prefill_rows = [1, 2, 3, 5, 6, 7, 8, 9]
    assert torch.equal(out[prefill_rows], ref[prefill_rows])  # the same planned path for the prefills


def test_other_steps_and_calls_run_the_torch_path(ext):
    hq, hkv, d = 4, 2, 16
    kernels = CountingKernels(ext)
    backend = TorchAttention(cpu_kernels=kernels)
    decode = make_paged_batch([1, 1], [4, 17], hq, hkv, d, 16, torch.float32, seed=7)
    new = _new_kv(2, hkv, d, torch.float32)
    span = (BidirectionalSpan(0, 0, 5),)
    out, *_ = _step(backend, decode, *new, bidirectional=span)
    ref, *_ = _step(TorchAttention(), decode, *new, bidirectional=span)
    assert torch.equal(out, ref) and kernels.calls["paged_decode"] == 0
    # V cached at another head size than K (MLA-like): the kernel is not tested there, the torch path runs
    mla = make_paged_batch([1], [9], hq, hkv, d, 16, torch.float32, seed=8)
    mla = dataclasses.replace(mla, v_cache=torch.randn(*mla.v_cache.shape[:-1], 8))
    new = _new_kv(1, hkv, d, torch.float32)
    new = new[0], torch.randn(1, hkv, 8)
    out, *_ = _step(backend, mla, *new)
    ref, *_ = _step(TorchAttention(), mla, *new)
    assert out.shape == (1, hq, 8) and torch.equal(out, ref) and kernels.calls["paged_decode"] == 0


@pytest.mark.parametrize("dk,dv", [(16, 8), (8, 16)])
def test_a_padded_slot_runs_the_kernel_through_paged_attention(ext, dk, dv):
    """K and V head sizes differ, cached at one head size (KVSlot.padded: the larger): paged_attention pads the
    smaller of q / k or v with zeros, the kernel attends over them (the same products), and the padded V columns
    are cut off: the torch path's output."""
    from types import SimpleNamespace

    from backend.layers.attention import paged_attention

    hq, hkv, d = 4, 2, max(dk, dv)
    paged = make_paged_batch([1, 1], [6, 19], hq, hkv, d, 16, torch.float32, seed=9)
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, h, n, generator=gen) for h, n in ((hq, dk), (hkv, dk), (hkv, dv)))

    def run(backend: TorchAttention) -> torch.Tensor:
        k_cache, v_cache = paged.k_cache.clone(), paged.v_cache.clone()
        k_cache[..., dk:], v_cache[..., dv:] = 0, 0  # the padded columns as the store leaves them
        qsl, lens = paged.query_start_loc.tolist(), paged.seq_lens.tolist()
        batch = SimpleNamespace(
            kv_cache=SimpleNamespace(k=[k_cache], v=[v_cache]),
            attention=backend,
            attn_metadata=backend.prepare(qsl, lens, paged.block_tables, 16),
            slot_mapping=paged.slot_mapping,
            query_start_loc=paged.query_start_loc,
            seq_lens=paged.seq_lens,
            block_tables=paged.block_tables,
            max_query_len=1,
            max_seq_len=paged.max_seq_len,
            bidirectional=(),
        )  # the fields of ForwardBatch that paged_attention reads
        return paged_attention(q, k, v, 0, batch, 0.25)

    kernels = CountingKernels(ext)
    out = run(TorchAttention(cpu_kernels=kernels))
    ref = run(TorchAttention())
    assert out.shape == (2, hq, dv) and kernels.calls["paged_decode"] == 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _tokens(path, count: bool = False, **options) -> tuple[list[list[int]], dict, int]:
    """Greedy tokens, describe(), and (count=True) how many paged decode kernel calls the engine's backend made."""
    with Engine(str(path), num_kv_blocks=64, model_impl="transformers", **options) as engine:
        kernels = None
        if count:
            assert isinstance(engine.attention, TorchAttention) and engine.attention.cpu_kernels is not None
            kernels = engine.attention.cpu_kernels = CountingKernels(engine.attention.cpu_kernels)
        outs = engine.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        calls = kernels.calls["paged_decode"] if kernels else 0
        layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
        info = dict(engine.describe(), layers=layers)
        return [o.token_ids for o in outs], info, calls


@pytest.mark.parametrize(
    "arch", ["llama", "gemma2", *(pytest.param(a, marks=pytest.mark.slow) for a in ("mistral", "gpt_oss"))]
)
def test_transformers_fp32_decode_on_the_kernel_gives_the_torch_tokens(tiny_model, arch):
    """gemma2: softcap 5 and a sliding window of 8 tokens on every other layer (prompts of up to 21 tokens, 12 new:
    the window cuts); mistral (slow): a window of 8 on every layer; gpt_oss (slow): sinks and a window of 8."""
    path = tiny_model(arch)
    fused, info, calls = _tokens(path, count=True, cpu_kernels="fused")
    plain, plain_info, _ = _tokens(path, cpu_kernels="torch")
    assert info["cpu_kernels"] == "fused" and plain_info["cpu_kernels"] == "torch"
    assert fused == plain
    # the three prompts prefill in one step (which samples their first token; the one-token prompt is a row of one
    # new token there, which the kernel takes), then 11 decode-only steps: each layer's attention on the kernel in
    # each of the 12
    assert calls == 12 * info["layers"], (calls, info["layers"])


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    from backend.tools.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("bf16") / "llama", dtype=torch.bfloat16)


def test_transformers_bf16_decode_on_the_kernel_gives_the_torch_tokens(bf16_llama):
    fused, info, calls = _tokens(bf16_llama, count=True, cpu_kernels="fused")
    plain, _, _ = _tokens(bf16_llama, cpu_kernels="torch")
    assert info["cpu_kernels"] == "fused" and calls > 0
    # bf16: products summed in another order may round differently; the tiny model's greedy choices are clear
    assert fused == plain
