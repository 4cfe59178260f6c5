"""Engine(tp_size=N) itself: the engine starts its own tensor-parallel group and shuts it down on close (the
other distributed tests share one group per module through backend.distributed.testing)."""

from __future__ import annotations


def test_engine_tp_size_option_starts_its_own_group(tiny_model):
    """Engine(tp_size=2) itself: its own group (started and shut down by the engine), the layout in describe()."""
    from backend import Engine, SamplingParams

    path = str(tiny_model("llama"))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    with Engine(path, model_impl="native", dtype="float32", max_model_len=64) as one:
        expected = one.generate(["Hello world"], params)[0].token_ids
    with Engine(path, model_impl="native", dtype="float32", max_model_len=64, tp_size=2) as two:
        assert two.generate(["Hello world"], params)[0].token_ids == expected
        ranks = two.describe()["tensor_parallel"]
        assert len(ranks["ranks"] if isinstance(ranks, dict) else ranks) == 2
    import torch.distributed as dist

    assert not dist.is_initialized()  # close() shut the group down
