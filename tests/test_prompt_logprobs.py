"""prompt_logprobs: each prompt token's logprob given its prefix, against HF's full forward, under chunked
prefill, prefix caching and preemption; validation; KV blocks freed afterwards."""

import pytest
import torch

from backend import Engine, SamplingParams
from backend.core.errors import RequestError
from tests.helpers import PROMPTS, hf_logits

TOL = 1e-4


def reference(path, ids: list[int]) -> torch.Tensor:  # (L, V): row i = log p(. | ids[:i+1])
    return torch.log_softmax(hf_logits(path, ids).float(), dim=-1)


def check_against(ref: torch.Tensor, ids: list[int], out, top_n: int) -> None:
    assert len(out.prompt_logprobs) == len(ids)
    assert out.prompt_logprobs[0] is None
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert out.prompt_logprobs[1:] == pytest.approx(expected, abs=TOL)
    if not top_n:
        assert out.prompt_top_logprobs is None
        return
    assert out.prompt_top_logprobs[0] is None
    for i in range(1, len(ids)):
        values, top_ids = torch.topk(ref[i - 1], top_n)
        assert [t for t, _ in out.prompt_top_logprobs[i]] == top_ids.tolist()
        assert [v for _, v in out.prompt_top_logprobs[i]] == pytest.approx(values.tolist(), abs=TOL)


def assert_all_blocks_free(engine: Engine) -> None:
    engine.check_invariants()
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("arch,impl", [("llama", "native"), ("gpt2", "transformers")])
def test_prompt_logprobs_equal_hf_log_softmax(tiny_model, arch, impl):
    path = tiny_model(arch)
    with Engine(str(path), dtype="float32", model_impl=impl) as engine:
        assert engine.model_impl == impl
        ids = engine.tokenizer.encode(PROMPTS[1])
        params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
        out = engine.generate(prompt_token_ids=[ids], sampling_params=params)[0]
        check_against(reference(path, ids), ids, out, top_n=3)
        plain = engine.generate(
            prompt_token_ids=[ids], sampling_params=SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
        )[0]
        assert plain.prompt_logprobs is None and plain.prompt_top_logprobs is None
        assert plain.token_ids == out.token_ids  # the extra rows do not change what is sampled
        assert_all_blocks_free(engine)


def test_chunked_prefill_mixed_batch(tiny_model):
    """Prefills split over steps of 5 tokens, next to requests that do not ask and a one-token prompt."""
    path = tiny_model("llama")
    with Engine(str(path), dtype="float32", max_num_batched_tokens=5, block_size=4) as engine:
        prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        params = [
            SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=n)
            for n in (0, 2, None, 1)
        ]
        outs = engine.generate(prompt_token_ids=prompts + [[7]], sampling_params=params + [params[0]])
        for ids, p, out in zip(prompts, params, outs):
            if p.prompt_logprobs is None:
                assert out.prompt_logprobs is None
            else:
                check_against(reference(path, ids), ids, out, top_n=p.prompt_logprobs)
        assert outs[-1].prompt_logprobs == [None]
        assert_all_blocks_free(engine)


def test_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_model):
    path = tiny_model("llama")
    with Engine(str(path), dtype="float32", block_size=4) as engine:
        ids = engine.tokenizer.encode(PROMPTS[1])
        greedy = dict(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        engine.generate(prompt_token_ids=[ids[:12]], sampling_params=SamplingParams(**greedy))  # caches 2 blocks
        out = engine.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(**greedy, prompt_logprobs=0))[0]
        assert out.num_cached_tokens == 0
        check_against(reference(path, ids), ids, out, top_n=0)
        again = engine.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(**greedy))[0]
        assert again.num_cached_tokens > 0  # other requests still hit the cache
        assert again.token_ids == out.token_ids
        assert_all_blocks_free(engine)


def test_preemption_recomputes_prompt_logprobs(tiny_model):
    path = tiny_model("llama")
    with Engine(
        str(path), dtype="float32", block_size=4, num_kv_blocks=12, max_model_len=40, max_num_batched_tokens=8
    ) as engine:
        prompts = [engine.tokenizer.encode(p)[:20] for p in PROMPTS]
        params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
        outs = engine.generate(prompt_token_ids=prompts, sampling_params=params)
        assert engine.stats().num_preemptions > 0
        for ids, out in zip(prompts, outs):
            check_against(reference(path, ids), ids, out, top_n=1)
        assert_all_blocks_free(engine)


def test_stream_carries_prompt_logprobs(tiny_model):
    path = tiny_model("llama")
    with Engine(str(path), dtype="float32") as engine:
        ids = engine.tokenizer.encode(PROMPTS[0])
        deltas = list(
            engine.stream(
                prompt_token_ids=ids,
                params=SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=0),
            )
        )
        check_against(reference(path, ids), ids, deltas[-1].output, top_n=0)


@pytest.mark.parametrize("bad", [-1, 21, 1.5, "2", True])
def test_bad_prompt_logprobs_are_refused(bad):
    with pytest.raises(RequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
