"""The tensor-parallel group: worker processes (torch.multiprocessing spawn), torch.distributed's process group
(gloo on CPU, NCCL on CUDA), and rank 0's side of the command protocol (protocol.py).

Rank 0 is the engine process: it holds the scheduler, the KV block allocator and the sampler, and runs its own
shard. Every wait is bounded: workers starting, loading and answering are polled together with their liveness
(a dead worker is reported at once, with its exit code and its error text when it wrote one); collectives time
out after `timeout_s` (and fail at once when a peer's connection closes). A failure shuts the whole group down;
every later call then raises `TensorParallelError` with the first failure's reason.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backend.core.config import EngineConfig
from backend.core.errors import EngineError
from backend.core.kv_cache import KVCache
from backend.distributed.comm import TPContext
from backend.distributed.errors import TensorParallelError
from backend.distributed.protocol import (
    KV,
    LOAD,
    PROBE,
    SHUTDOWN,
    STEP,
    UNLOAD,
    Command,
    KVRequest,
    Reply,
    StepMeta,
    dumps,
    loads,
)
from backend.distributed.shard import RankShard, load_rank, probe, rank_shard
from backend.loading.build import LoadedModel
from flab_kernels import dispatch as kernel_dispatch

logger = logging.getLogger(__name__)

POLL_S = 0.002  # rank 0's polling interval while it waits for workers' answers
EXIT_GRACE_S = 5.0  # how long a worker gets to exit after the shutdown command (then it is killed)


@dataclass
class TPOptions:
    tp_size: int
    timeout_s: float = 60.0  # bound on every collective and on every setup answer but loading
    load_timeout_s: float = 900.0  # a worker loading (and sharding) the model
    start_timeout_s: float = 180.0  # workers starting (imports) and joining the process group
    threads_per_rank: int | None = None  # torch CPU threads per rank; None: this process's threads / tp_size

    def __post_init__(self) -> None:
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 2:
            raise EngineError(f"tensor parallelism needs tp_size >= 2 ranks, got {self.tp_size!r}")
        for name in ("timeout_s", "load_timeout_s", "start_timeout_s"):
            if not getattr(self, name) > 0:
                raise EngineError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class TensorParallelGroup:
    """Start with `TensorParallelGroup.start(options, device_type)`; then `load(cfg)` a model on every rank,
    `allocate_kv(cache)`, run steps through a DistributedRunner, `unload()`, and `shutdown()`."""

    def __init__(self, options: TPOptions, store: dist.TCPStore, processes: list, backend: str, threads: int) -> None:
        self.options = options
        self.world_size = options.tp_size
        self.backend = backend
        self.ctx = TPContext(0, self.world_size)
        self._store = store
        self._ctl = dist.PrefixStore("ctl/", store)
        self._processes = processes  # rank r is processes[r - 1]
        self._threads = threads
        self._previous_threads = torch.get_num_threads()
        self._next_cmd = 0
        self._pg_initialized = False
        self.failure: str | None = None
        self.closed = False
        self.loaded: LoadedModel | None = None
        self.ranks: list[RankShard] = []

    # --- start / stop -------------------------------------------------------------------------------

    @classmethod
    def start(cls, options: TPOptions, device_type: str = "cpu") -> "TensorParallelGroup":
        if not dist.is_available():
            raise EngineError("tensor parallelism needs torch.distributed, which this torch build lacks")
        if dist.is_initialized():
            raise EngineError(
                "a tensor-parallel group already runs in this process (one per process, on torch.distributed's "
                "default group): close that engine first"
            )
        backend = "nccl" if device_type == "cuda" else "gloo"
        world = options.tp_size
        threads = options.threads_per_rank or max(1, torch.get_num_threads() // world)
        timeout = timedelta(seconds=options.timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=timeout, wait_for_workers=False)
        from backend.distributed.worker import worker_main

        saved = os.environ.get("TORCH_CPP_LOG_LEVEL")
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"  # the workers' idle store waits time out quietly
        try:
            context = mp.start_processes(
                worker_main,
                args=(store.port, world, backend, threads, options.timeout_s),
                nprocs=world - 1,
                join=False,
                daemon=True,
                start_method="spawn",
            )
        finally:
            if saved is None:
                os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
            else:
                os.environ["TORCH_CPP_LOG_LEVEL"] = saved
        group = cls(options, store, list(context.processes), backend, threads)
        try:
            group._await_keys([f"hello/{r}" for r in group.worker_ranks], options.start_timeout_s, "starting")
            dist.init_process_group(
                backend, store=dist.PrefixStore("pg/", store), rank=0, world_size=world, timeout=timeout
            )
            group._pg_initialized = True
        except BaseException:
            group._stop(graceful=False)
            raise
        torch.set_num_threads(threads)
        logger.info("tensor-parallel group of %d ranks (%s, %d threads each) started", world, backend, threads)
        return group

    @property
    def worker_ranks(self) -> range:
        return range(1, self.world_size)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1."""
        return [p.pid for p in self._processes]

    def shutdown(self) -> None:
        """Stop the workers (bounded: killed after EXIT_GRACE_S) and leave the process group. Idempotent."""
        self._stop(graceful=self.failure is None)

    def _stop(self, graceful: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if graceful:
            try:
                self._post(SHUTDOWN)
            except Exception:  # the store is gone: the workers notice and exit by themselves
                graceful = False
        deadline = time.monotonic() + (EXIT_GRACE_S if graceful else 0.0)
        for p in self._processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=EXIT_GRACE_S)
        if self._pg_initialized and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group may refuse a clean teardown; the process keeps going
                logger.warning("destroying the tensor-parallel process group failed", exc_info=True)
        self._pg_initialized = False
        self.loaded = None
        torch.set_num_threads(self._previous_threads)

    # --- model and cache ----------------------------------------------------------------------------

    def load(self, cfg: EngineConfig, progress=None) -> LoadedModel:
        """Every rank loads `cfg`'s model and cuts it to its part; returns rank 0's. Errors of rank 0 (a model
        without a TP plan, heads that do not divide) are raised as they are; a worker's as TensorParallelError."""
        self._require_usable()
        if self.loaded is not None:
            raise EngineError("this tensor-parallel group already holds a model: unload it first")
        settings = kernel_dispatch.current()
        n = self._post(LOAD, (cfg, settings))
        try:
            loaded, summary = load_rank(cfg, self.ctx, progress)
        except BaseException:
            self._replies(n, self.options.load_timeout_s, "loading the model", check=False)
            self._discard()
            raise
        replies = self._replies(n, self.options.load_timeout_s, "loading the model", check=False)
        bad = [(r, rep) for r, rep in zip(self.worker_ranks, replies) if not rep.ok]
        if bad:
            self._discard()
            r, rep = bad[0]
            raise TensorParallelError(f"tensor-parallel rank {r} could not load {cfg.model}: {rep.error}")
        self._check_same_layout(summary, [rep.value for rep in replies])
        n = self._post(PROBE)
        try:
            probe(loaded)  # a forward with collectives, on every rank at once
        except BaseException as e:
            raise self._fail(f"the load-time probe forward failed on rank 0: {type(e).__name__}: {e}") from e
        shards = self._replies(n, self.options.timeout_s, "the probe forward")
        self.ranks = [rank_shard(loaded, self.ctx, summary)] + [rep.value for rep in shards]
        self.loaded = loaded
        return loaded

    def allocate_kv(self, kv_cache: KVCache) -> None:
        """Every worker allocates a KV cache of rank 0's layout and block count (same heads per rank)."""
        self._require_usable()
        n = self._post(KV, KVRequest(kv_cache.spec, kv_cache.num_blocks))
        replies = self._replies(n, self.options.timeout_s, "allocating the KV cache")
        for shard, nbytes in zip(self.ranks, [kv_cache.nbytes] + [rep.value for rep in replies]):
            shard.kv_cache_bytes = nbytes

    def unload(self) -> None:
        """Drop the model and the KV caches on every rank (the group stays up)."""
        self.loaded = None
        self.ranks = []
        if self.failure is None and not self.closed:
            self._discard()

    def _discard(self) -> None:
        n = self._post(UNLOAD)
        self._replies(n, self.options.timeout_s, "unloading", check=False)

    def _check_same_layout(self, summary: dict, others: list[dict]) -> None:
        mine = {k: summary.get(k) for k in ("q_heads", "kv_heads")}
        for r, other in zip(self.worker_ranks, others):
            sizes = [b - a for a, b in (other.get("q_heads", [0, 0]), other.get("kv_heads", [0, 0]))]
            if sizes != [b - a for a, b in mine.values()]:
                self._discard()
                raise TensorParallelError(f"rank {r} holds {sizes} (q, kv) heads, rank 0 holds another count")

    # --- steps --------------------------------------------------------------------------------------

    def post_step(self, fb) -> None:
        """Send the step's metadata to the workers (once per step); rank 0 then runs its own shard."""
        self._require_usable()
        self._check_alive()
        self._post(STEP, StepMeta.of(fb))

    def step_failed(self, error: BaseException) -> TensorParallelError:
        """Rank 0's forward raised (a peer's connection closed, a collective timed out, or its own error): find
        out which rank failed, shut the group down, and return the error to raise."""
        deadline = time.monotonic() + 2.0  # a worker that raised is exiting: give its exit code time to show
        while time.monotonic() < deadline and all(p.exitcode is None for p in self._processes):
            time.sleep(0.01)
        dead = self._dead_ranks()
        if dead:
            return self._fail(f"tensor-parallel step failed: {dead[0]}")
        return self._fail(f"tensor-parallel step failed on rank 0: {type(error).__name__}: {error}")

    # --- protocol -----------------------------------------------------------------------------------

    def _post(self, kind: str, payload=None) -> int:
        n = self._next_cmd
        self._next_cmd += 1
        self._ctl.set(f"cmd/{n}", dumps(Command(kind, payload)))
        if n:  # every worker has read it: a step's collectives ran, a setup command was answered
            self._ctl.delete_key(f"cmd/{n - 1}")
        return n

    def _replies(self, n: int, timeout: float, what: str, check: bool = True) -> list[Reply]:
        keys = [f"reply/{n}/{r}" for r in self.worker_ranks]
        self._await_keys(keys, timeout, what)
        replies = [loads(self._ctl.get(k)) for k in keys]
        for k in keys:
            self._ctl.delete_key(k)
        if check:
            for r, rep in zip(self.worker_ranks, replies):
                if not rep.ok:
                    raise self._fail(f"tensor-parallel rank {r} failed {what}: {rep.error}")
        return replies

    def _await_keys(self, keys: list[str], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self._ctl.check(keys):
            self._check_alive()
            if time.monotonic() > deadline:
                missing = [k for k in keys if not self._ctl.check([k])]
                raise self._fail(f"tensor-parallel workers did not answer {what} within {timeout:.0f} s ({missing})")
            time.sleep(POLL_S)

    # --- health -------------------------------------------------------------------------------------

    def _dead_ranks(self) -> list[str]:
        out = []
        for r, p in zip(self.worker_ranks, self._processes):
            if p.exitcode is not None:
                text = f"rank {r} died ({describe_exit(p.exitcode)})"
                error = self._error_of(r)
                out.append(f"{text}: {error}" if error else text)
        return out

    def _error_of(self, rank: int) -> str:
        try:
            if self._ctl.check([f"error/{rank}"]):
                return self._ctl.get(f"error/{rank}").decode("utf-8", "replace")
        except Exception:  # the store itself may be gone
            pass
        return ""

    def problem(self) -> str | None:
        """Why this group cannot run steps (its first failure, a rank that died since, or shut down); None while
        it can. Only reads: a dead rank found here fails the group at its next step. A group never recovers."""
        if self.failure is not None:
            return f"the tensor-parallel group is down: {self.failure}"
        if self.closed:
            return "the tensor-parallel group is shut down"
        dead = self._dead_ranks()
        return f"the tensor-parallel group is down: {dead[0]}" if dead else None

    def _check_alive(self) -> None:
        dead = self._dead_ranks()
        if dead:
            raise self._fail(dead[0])

    def _require_usable(self) -> None:
        if self.failure is not None:
            raise TensorParallelError(f"the tensor-parallel group is down: {self.failure}")
        if self.closed:
            raise TensorParallelError("the tensor-parallel group is shut down")

    def _fail(self, message: str) -> TensorParallelError:
        if self.failure is None:
            self.failure = message
            logger.error("tensor-parallel group failed: %s; shutting it down", message)
            self._stop(graceful=False)
        return TensorParallelError(message)

    def describe(self) -> dict:
        return dict(
            tp_size=self.world_size,
            backend=self.backend,
            threads_per_rank=self._threads,
            failure=self.failure,
            worker_pids=self.worker_pids,  # ranks 1..N-1 (rank 0 is this process)
            ranks=[r.as_dict() for r in self.ranks],
        )
