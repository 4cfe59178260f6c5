"""Caps over a request, the Benchmark tab, per-visitor sequences and models, and the memory check before any
download (a local folder and a fake Hub whose safetensors headers declare a huge tensor)."""

from __future__ import annotations

import threading

import pytest

from backend.hosting import (
    HostingError,
    HostPolicy,
    ModelSettings,
    ModelSlots,
    VisitorLimiter,
    check_benchmark,
    check_model_fits,
    check_request,
    clamp_request,
)
from tests.hosting.fakehub import cached_weight_files, fake_hub, llama_config, safetensors_header_only, write_folder

GIB = 1024**3
HOSTED = HostPolicy.hosted_defaults(max_new_tokens=512, max_prompt_tokens=4096, max_parallel_per_visitor=4)
# 128256 x 4096 embeddings + 32 layers' worth in one declared tensor: ~15 GiB of BF16 weights, no data on disk
HUGE = {
    "model.embed_tokens.weight": ("BF16", [128256, 4096]),
    "model.layers.0.mlp.up_proj.weight": ("BF16", [14336, 4096 * 128]),
}


def test_request_over_the_caps():
    with pytest.raises(HostingError) as e:
        check_request(HOSTED, max_new_tokens=513, prompt_tokens=10)
    assert str(e.value) == "max new tokens 513 is over this host's cap of 512: ask for at most 512 new tokens"
    with pytest.raises(HostingError) as e:
        check_request(HOSTED, max_new_tokens=16, prompt_tokens=4097)
    assert str(e.value) == "the prompt is 4097 tokens, over this host's cap of 4096 prompt tokens: shorten it"
    check_request(HOSTED, max_new_tokens=512, prompt_tokens=4096)  # at the caps: fine
    check_request(HostPolicy(), max_new_tokens=10**6, prompt_tokens=10**6)  # not hosted: no caps


def test_clamp_only_the_default():
    assert clamp_request(HOSTED, None, default=1024) == 512
    assert clamp_request(HOSTED, None, default=16) == 16
    assert clamp_request(HOSTED, 700, default=16) == 700  # a chosen value is check_request's to refuse
    assert clamp_request(HostPolicy(), None, default=1024) == 1024


def test_benchmark_is_host_only_when_hosted():
    with pytest.raises(HostingError) as e:
        check_benchmark(HostPolicy.hosted_defaults())
    assert str(e.value) == (
        "the Benchmark tab is for the host only on this host (it replaces the engine everyone shares); run the app "
        "on your own machine to benchmark"
    )
    check_benchmark(HostPolicy.hosted_defaults(allow_benchmark=True))
    check_benchmark(HostPolicy())


def test_parallel_sequences_per_visitor():
    limiter = VisitorLimiter(HOSTED)
    with pytest.raises(HostingError) as e:
        limiter.acquire("alice", 32)
    assert str(e.value) == (
        "this request runs 32 sequences at once and this host allows at most 4 per visitor: ask for at most 4"
    )
    with limiter.running("alice", 3):
        with pytest.raises(HostingError) as e:
            with limiter.running("alice", 2):
                pass
        assert str(e.value) == (
            "you already have 3 sequence(s) running and this host allows 4 per visitor at once: wait for them to finish"
        )
        with limiter.running("bob", 4):  # another visitor is not affected
            assert limiter.in_use("bob") == 4
        with limiter.running("alice", 1):
            assert limiter.in_use("alice") == 4
    assert limiter.in_use("alice") == 0 and limiter.in_use("bob") == 0


def test_parallel_cap_holds_under_threads():
    limiter = VisitorLimiter(HostPolicy.hosted_defaults(max_parallel_per_visitor=2))
    inside, peak, refused = [0], [0], []
    lock, go = threading.Lock(), threading.Barrier(8)

    def visit() -> None:
        go.wait()
        try:
            with limiter.running("greedy"):
                with lock:
                    inside[0] += 1
                    peak[0] = max(peak[0], inside[0])
                go_on.wait()
                with lock:
                    inside[0] -= 1
        except HostingError:
            refused.append(1)

    go_on = threading.Event()
    threads = [threading.Thread(target=visit) for _ in range(8)]
    for t in threads:
        t.start()
    while len(refused) + inside[0] < 8:  # every thread has either a slot or its refusal
        threading.Event().wait(0.01)
    go_on.set()
    for t in threads:
        t.join(timeout=30)
    assert peak[0] == 2 and len(refused) == 6 and limiter.in_use("greedy") == 0


def test_visitor_models():
    slots = ModelSlots(HostPolicy.hosted_defaults(max_visitor_models=1))
    slots.claim("alice")
    slots.claim("alice")  # loading another model keeps the same slot
    with pytest.raises(HostingError) as e:
        slots.claim("bob")
    assert str(e.value) == (
        "this host lets 1 visitor(s) load their own model at a time and all are in use: use the host's model, or "
        "try again later"
    )
    slots.release("alice")
    slots.claim("bob")
    with pytest.raises(HostingError) as e:
        ModelSlots(HostPolicy.hosted_defaults(max_visitor_models=0)).claim("alice")
    assert str(e.value) == "this host does not let visitors load their own model: use the host's model"
    unlimited = ModelSlots(HostPolicy())
    for who in "abcdef":
        unlimited.claim(who)
    assert unlimited.holders() == 6


def eight_gib(device: str) -> tuple[int, str]:
    return 8 * GIB, "available RAM"


def test_oversized_local_model_is_refused_from_its_headers(tmp_path):
    folder = write_folder(
        tmp_path / "big", {"config.json": llama_config(), "model.safetensors": safetensors_header_only(HUGE)}
    )
    assert (folder / "model.safetensors").stat().st_size < 1000  # the declared 15 GiB are not there
    with pytest.raises(HostingError) as e:
        check_model_fits(str(folder), ModelSettings(context_len=4096, num_seqs=1), HOSTED, free=eight_gib)
    assert str(e.value) == (
        f"{folder} does not fit this machine: it needs about 15.5 GiB (weights 15.0 GiB + KV cache 512.0 MiB for "
        "1 x 4096 tokens) and the machine has 8.00 GiB available RAM; pick a smaller model, a quantization "
        "(int8, int4) or a shorter context, or a smaller KV budget"
    )


def test_real_free_memory_refuses_a_declared_petabyte(tmp_path):
    folder = write_folder(
        tmp_path / "huge",
        {
            "config.json": llama_config(),
            "model.safetensors": safetensors_header_only({"lm_head.weight": ("BF16", [10**8, 10**7])}),
        },
    )
    with pytest.raises(HostingError, match=r"does not fit this machine: it needs about .* and the machine has"):
        check_model_fits(str(folder), ModelSettings(), HOSTED)


def test_kv_cache_counts(tmp_path):
    """Weights that fit, and a KV cache at the chosen settings that does not."""
    small = {"model.embed_tokens.weight": ("BF16", [128256, 4096])}  # 1002 MiB
    folder = write_folder(
        tmp_path / "m", {"config.json": llama_config(), "model.safetensors": safetensors_header_only(small)}
    )
    fits = check_model_fits(str(folder), ModelSettings(context_len=4096, num_seqs=1), HOSTED, free=eight_gib)
    assert fits is not None and fits.total_bytes < 8 * GIB
    with pytest.raises(HostingError, match=r"KV cache 16.0 GiB for 32 x 4096 tokens"):
        check_model_fits(str(folder), ModelSettings(context_len=4096, num_seqs=32), HOSTED, free=eight_gib)


def test_memory_check_on_when_not_hosted_and_off_when_the_host_says(tmp_path):
    folder = write_folder(
        tmp_path / "big", {"config.json": llama_config(), "model.safetensors": safetensors_header_only(HUGE)}
    )
    with pytest.raises(HostingError, match="does not fit this machine"):
        check_model_fits(str(folder), ModelSettings(), HostPolicy(), free=eight_gib)
    assert check_model_fits(str(folder), ModelSettings(), HostPolicy(check_memory=False), free=eight_gib) is None


def test_oversized_hub_model_is_refused_before_any_download(tmp_path, monkeypatch):
    repos = {"org/big": {"config.json": llama_config(), "model.safetensors": safetensors_header_only(HUGE)}}
    cache = tmp_path / "cache"
    with fake_hub(monkeypatch, cache, repos) as hub:
        with pytest.raises(HostingError) as e:
            check_model_fits("org/big", ModelSettings(), HOSTED, free=eight_gib)
        # the header was read through a range request, never downloaded into the cache
        ranged = [h for c, p, h in hub.requests if c == "GET" and p.endswith("model.safetensors")]
    assert str(e.value).startswith("org/big does not fit this machine: it needs about 15.5 GiB")
    assert ranged and cached_weight_files(cache) == []


def test_builtin_not_built_is_not_estimated(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAB_CACHE_DIR", str(tmp_path / "empty-cache"))
    assert check_model_fits("tiny:llama", ModelSettings(), HOSTED, free=eight_gib) is None


def test_builtin_built_is_estimated(tmp_path, monkeypatch, tiny_model):
    import shutil

    monkeypatch.setenv("FLAB_CACHE_DIR", str(tmp_path / "flab"))
    from backend.loading.builtin import builtin_path

    shutil.copytree(tiny_model("llama"), builtin_path("tiny:llama"))
    estimate = check_model_fits("tiny:llama", ModelSettings(context_len=64), HOSTED, free=eight_gib)
    assert estimate is not None and 0 < estimate.total_bytes < GIB
    with pytest.raises(HostingError, match="tiny:llama does not fit this machine"):
        check_model_fits("tiny:llama", ModelSettings(context_len=64), HOSTED, free=lambda d: (1, "available RAM"))


def test_free_memory_reads_the_machine():
    import psutil
    import torch

    from backend.hosting.limits import free_memory

    free, what = free_memory("cpu")
    assert what == "available RAM" and 0 < free <= psutil.virtual_memory().total
    free, what = free_memory("auto")
    assert what == ("free GPU memory on cuda" if torch.cuda.is_available() else "available RAM")
    if torch.cuda.is_available():
        free, what = free_memory("cuda:0")
        assert what == "free GPU memory on cuda:0" and 0 < free <= torch.cuda.get_device_properties(0).total_memory


def test_a_moe_that_fits_quantized_but_not_while_loading_is_refused(tmp_path):
    """int4 experts fit, but each layer's load at full precision first: the check compares the load peak (one
    layer's experts at full precision beside the quantized rest), and says so."""
    experts = {}
    for i in range(4):  # 4 layers of 8 experts, Mixtral-8x7B-sized: ~2.6 GiB of BF16 experts each, ~0.7 GiB int4
        experts[f"model.layers.{i}.mlp.experts.gate_up_proj"] = ("BF16", [8, 2 * 14336, 4096])
        experts[f"model.layers.{i}.mlp.experts.down_proj"] = ("BF16", [8, 4096, 14336])
    folder = write_folder(
        tmp_path / "moe",
        {
            "config.json": llama_config(architectures=["MixtralForCausalLM"], model_type="mixtral"),
            "model.safetensors": safetensors_header_only(experts),
        },
    )
    settings = ModelSettings(context_len=256, num_seqs=1, quantization="int4")
    fits = check_model_fits(str(folder), settings, HOSTED, free=lambda device: (6 * GIB, "available RAM"))
    assert fits.total_bytes < 4 * GIB < fits.load_peak_bytes < 6 * GIB
    with pytest.raises(HostingError) as e:
        check_model_fits(str(folder), settings, HOSTED, free=lambda device: (4 * GIB, "available RAM"))
    assert "while loading, before its MoE experts are quantized" in str(e.value)
