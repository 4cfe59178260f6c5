"""A worker killed mid-run: the engine fails the in-flight request with an error naming the rank and how it
died, shuts the group down, fails later requests at once, and closes; nothing waits without a bound."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch.distributed as dist

from backend import SamplingParams
from backend.core.errors import RequestFailedError
from backend.distributed import TensorParallelGroup, TPOptions
from backend.distributed.testing import make_tp_engine

HANG_GUARD_S = 120  # a hang fails the test instead of blocking the suite; not a speed requirement


def _watched_engine(tiny_model, timeout_s: float):
    """A tp_size=2 engine on the tiny llama whose group the test holds (to watch it shut down) -> (group, engine,
    the worker's pid)."""
    group = TensorParallelGroup.start(TPOptions(2, timeout_s=timeout_s))
    engine = make_tp_engine(
        str(tiny_model("llama")),
        group=group,
        model_impl="native",
        dtype="float32",
        device="cpu",
        num_kv_blocks=64,
        block_size=8,
    )
    (pid,) = engine.describe()["tensor_parallel"]["worker_pids"]
    return group, engine, pid


def test_killed_worker_fails_requests_and_the_engine_closes(tiny_model):
    group, engine, pid = _watched_engine(tiny_model, timeout_s=30)
    params = SamplingParams(max_new_tokens=400, temperature=0.0, ignore_eos=True)
    seen: list[int] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for delta in engine.stream(prompt_token_ids=[1, 2, 3, 4], params=params):
                seen.extend(delta.token_ids)
                if len(seen) >= 3 and not errors:
                    os.kill(pid, signal.SIGKILL)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    t.join(HANG_GUARD_S)
    assert not t.is_alive(), "the stream did not end after its worker was killed"
    assert len(errors) == 1 and isinstance(errors[0], RequestFailedError), errors
    assert "rank 1 died (killed by signal SIGKILL)" in str(errors[0])
    assert 3 <= len(seen) < 400
    assert group.failure is not None and group.closed
    with pytest.raises(
        RequestFailedError, match=r"tensor-parallel group is down: .*rank 1 died \(killed by signal SIGKILL\)"
    ):
        engine.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(max_new_tokens=2))
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(HANG_GUARD_S)
    assert not closer.is_alive() and engine.closed
    assert not dist.is_initialized()  # this process left the process group: a new engine can start one


def test_hung_worker_times_out_instead_of_hanging(tiny_model):
    """A worker that stops answering (SIGSTOP) holds rank 0 in a collective only until the group's timeout: the
    request fails, the group is shut down (the stopped worker killed) and the engine closes."""
    group, engine, pid = _watched_engine(tiny_model, timeout_s=5)
    os.kill(pid, signal.SIGSTOP)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_new_tokens=4))
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(HANG_GUARD_S)
    assert not t.is_alive(), "the step hung on a stopped worker"
    assert len(errors) == 1 and isinstance(errors[0], RequestFailedError), errors
    assert "tensor-parallel step failed" in str(errors[0])
    assert group.failure is not None and group.closed
    assert not any(p.is_alive() for p in group._processes)  # the stopped worker was killed
    engine.close()
    assert not dist.is_initialized()


def test_a_worker_whose_step_raises_reports_its_error_and_exits():
    """The worker writes its exception where rank 0 reads it, then exits (its peers' collectives fail at once):
    rank 0's error names the rank, the exit code and the worker's own message."""
    import time

    from backend.distributed import TensorParallelError, TensorParallelGroup
    from backend.distributed.protocol import STEP

    group = TensorParallelGroup.start(TPOptions(2, timeout_s=30))
    try:
        group._post(STEP, "not a step")  # a payload the worker cannot run
        deadline = time.monotonic() + HANG_GUARD_S
        with pytest.raises(TensorParallelError, match=r"rank 1 died \(exited with code 1\): AttributeError"):
            while time.monotonic() < deadline:
                group._check_alive()
                time.sleep(0.05)
        assert group.closed
    finally:
        group.shutdown()
