"""A worker rank: joins the process group, then serves rank 0's commands (protocol.py) until shutdown.

It exits when rank 0 goes away: the store's socket closes (its waits fail) or its parent process changes. A
step that raises writes the error under `error/<rank>` and exits the process, so that rank 0's collectives fail
at once instead of waiting for a peer that will never come.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from backend.core.kv_cache import KVCache
from backend.distributed.comm import TPContext
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
from backend.distributed.shard import load_rank, probe, rank_shard
from backend.loading.build import LoadedModel
from flab_kernels import dispatch as kernel_dispatch

IDLE_WAIT_S = 30.0  # one wait for the next command; then the parent is checked and the wait repeats


def worker_main(index: int, port: int, world: int, backend: str, threads: int, timeout_s: float) -> None:
    """torch.multiprocessing entry point: process `index` is rank index + 1."""
    rank = index + 1
    torch.set_num_threads(threads)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timeout)
    ctl = dist.PrefixStore("ctl/", store)
    ctl.set(f"hello/{rank}", b"1")
    dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=rank, world_size=world, timeout=timeout)
    try:
        code = Worker(rank, world, ctl).serve()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (rank 0 gone) cannot be torn down cleanly; the process exits anyway
            pass
    sys.exit(code)


class Worker:
    def __init__(self, rank: int, world: int, ctl: dist.Store) -> None:
        self.rank = rank
        self.ctx = TPContext(rank, world)
        self.ctl = ctl
        self.parent = os.getppid()
        self.loaded: LoadedModel | None = None
        self.summary: dict = {}
        self.kv_cache: KVCache | None = None
        self.settings = kernel_dispatch.current()

    def serve(self) -> int:
        """Run commands in order; returns the exit code (0 after shutdown or when rank 0 is gone)."""
        n = 0
        while True:
            data = self._next_command(n)
            if data is None:
                return 0
            cmd = loads(data)
            if cmd.kind == SHUTDOWN:
                return 0
            if cmd.kind == STEP:
                try:
                    self._step(cmd.payload)
                except BaseException as e:
                    self.ctl.set(f"error/{self.rank}", f"{type(e).__name__}: {e}".encode())
                    traceback.print_exc()
                    return 1
            else:
                self._answer(n, cmd)
            n += 1

    def _next_command(self, n: int) -> bytes | None:
        key = f"cmd/{n}"
        while True:
            try:
                self.ctl.wait([key], timedelta(seconds=IDLE_WAIT_S))
                return self.ctl.get(key)
            except dist.DistStoreError as e:
                if "timeout" not in str(e).lower() or os.getppid() != self.parent:
                    return None  # the store (rank 0) is gone
            except (dist.DistError, RuntimeError, ConnectionError):
                return None

    def _answer(self, n: int, cmd: Command) -> None:
        try:
            reply = Reply(True, self._setup(cmd))
        except Exception as e:
            reply = Reply(False, error=f"{type(e).__name__}: {e}")
        self.ctl.set(f"reply/{n}/{self.rank}", dumps(reply))

    def _setup(self, cmd: Command):
        if cmd.kind == LOAD:
            cfg, self.settings = cmd.payload
            self.loaded = None
            with kernel_dispatch.using(self.settings):
                self.loaded, self.summary = load_rank(cfg, self.ctx)
            return self.summary
        if cmd.kind == PROBE:
            with kernel_dispatch.using(self.settings):
                probe(self.loaded)
            return rank_shard(self.loaded, self.ctx, self.summary)
        if cmd.kind == KV:
            req: KVRequest = cmd.payload
            self.kv_cache = None
            self.kv_cache = KVCache(req.spec, req.num_blocks, self.loaded.device)
            return self.kv_cache.nbytes
        if cmd.kind == UNLOAD:
            self.loaded, self.kv_cache, self.summary = None, None, {}
            gc.collect()
            return None
        raise ValueError(f"unknown command {cmd.kind!r}")

    def _step(self, meta: StepMeta) -> None:
        fb = meta.forward_batch(self.kv_cache, self.loaded.device)
        with torch.inference_mode(), kernel_dispatch.using(self.settings):
            self.loaded.model(fb)
