"""The server runs no thread per request: N streams open at once add at most the bounded worker threads (the event
loop's default executor, which tokenizes request bodies), never one each. The engine's steps are held
(`Engine.exclusive_steps`, public) while the streams open, so all N are held by the engine at the moment the threads
are counted, whatever the machine's speed; then they run to the end and each stream is checked whole."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import pytest

from backend import Engine
from backend.server import build_app
from tests.server.conftest import SERVED, start_server, wait_idle

MAX_TOKENS = 4
# The threads N streams may add at most, whatever N: the default executors of the server's and the client's event
# loops (min(32, cores + 4) each: tokenizing, name lookups) and a few of uvicorn's and asyncio's own (the API-key
# dependency is async: no AnyIO worker thread per request). One thread per request would exceed it.
THREAD_ALLOWANCE = 2 * min(32, (os.cpu_count() or 1) + 4) + 8


async def one_stream(client: httpx.AsyncClient, i: int) -> list[dict]:
    body = {
        "model": SERVED,
        "prompt": f"hello {i}",
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    chunks = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


async def open_streams(engine: Engine, url: str, n: int) -> tuple[int, list[list[dict]]]:
    """Open n streams while the engine's steps are held; count the process's threads once the engine holds all n."""
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        held = engine.exclusive_steps()
        held.__enter__()  # no step runs: every request stays queued
        try:
            tasks = [asyncio.create_task(one_stream(client, i)) for i in range(n)]
            deadline = time.monotonic() + 120
            while engine.num_requests < n:
                assert time.monotonic() < deadline, f"only {engine.num_requests} of {n} requests arrived"
                assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()][:1]
                await asyncio.sleep(0.05)
            threads = threading.active_count()
        finally:
            held.__exit__(None, None, None)
        results = await asyncio.gather(*tasks)
    return threads, results


@pytest.mark.parametrize("n", [96, pytest.param(256, marks=pytest.mark.slow)])
def test_open_streams_cost_no_thread_each(tiny_model, n):
    engine = Engine(str(tiny_model("llama")), dtype="float32", num_kv_blocks=512, max_num_seqs=16)
    server, thread, url = start_server(build_app(engine, served_model_name=SERVED))
    try:
        baseline = threading.active_count()
        threads, results = asyncio.run(open_streams(engine, url, n))
        print(f"{n} streams open: {threads} threads in the process ({threads - baseline} more than before)")
        assert threads - baseline <= min(THREAD_ALLOWANCE, n - 1), (threads, baseline)
        for chunks in results:  # each stream whole: a finish reason, and MAX_TOKENS tokens in its usage
            reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert reasons[-1] == "length", chunks
            assert chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS, chunks[-1]
        wait_idle(engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
