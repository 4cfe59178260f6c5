"""The quantization benchmark end to end on a tiny trained model (few steps): training lowers the loss, and
bench_quant produces sane rows for full precision and int8."""

import math

import pytest

from backend.loading.train_tiny import TrainConfig, ensure_trained, train
from backend.tools import bench_quant

TINY = TrainConfig(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=128,
    seq_len=32,
    batch_size=8,
    steps=40,
    lr=1e-2,
    warmup_steps=5,
    train_modules=("heapq", "bisect"),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return train(out, TINY, log=lambda _: None)


def test_training_lowers_the_loss_and_is_cached(trained):
    first, last = trained.losses[0], sum(trained.losses[-5:]) / 5
    assert math.isfinite(last) and last < first - 1.0, (first, last)
    mtime = (trained.path / "model.safetensors").stat().st_mtime_ns
    assert ensure_trained(trained.path, TINY) == trained.path  # same settings: not trained again
    assert (trained.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_bench_quant_rows(trained, tmp_path):
    out = tmp_path / "rows.json"
    rows = bench_quant.main(
        [
            "--model",
            str(trained.path),
            "--methods",
            "int8",
            "none",
            "--eval-windows",
            "2",
            "--eval-len",
            "32",
            "--prompt-len",
            "16",
            "--new-tokens",
            "4",
            "--batch",
            "2",
            "--json",
            str(out),
        ]
    )
    assert [r.method for r in rows] == ["none", "int8"]  # full precision first: the reference
    full, int8 = rows
    for r in rows:
        assert r.error is None
        assert r.eval_tokens == 2 * 31
        assert math.isfinite(r.nll) and 0 < r.nll < math.log(TINY.vocab_size)  # learned: below uniform
        assert r.ppl == pytest.approx(math.exp(r.nll))
        assert r.decode_tok_s > 0 and r.batch_tok_s > 0
    assert int8.weights_bytes < full.weights_bytes
    assert full.top1_agree is None and 0.5 < int8.top1_agree <= 1.0
    assert int8.delta_nll == pytest.approx(int8.nll - full.nll, abs=1e-9) and abs(int8.delta_nll) < 0.1
    assert int8.delta_nll_se >= 0 and full.delta_nll is None
    assert out.exists() and "int8" in bench_quant.markdown(rows, 2)
