"""One engine, many clients: 32 concurrent streams batched together, a third of them hanging up early."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.server.conftest import wait_idle

CLIENTS = 32
TOKENS = 24
LONG = 400  # what the clients that hang up ask for: they cannot finish before their abort lands


async def _stream(client: httpx.AsyncClient, i: int, hang_up_after: int | None) -> tuple[int, str | None]:
    """-> (token chunks read, finish reason or None if it hung up)."""
    max_tokens = TOKENS if hang_up_after is None else LONG
    body = {"prompt": f"request number {i}:", "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "seed": i}
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            chunks += 1
            if choice["finish_reason"]:
                return chunks, choice["finish_reason"]
            if hang_up_after is not None and chunks >= hang_up_after:
                return chunks, None  # leaving the block closes the connection mid-stream
    return chunks, "no finish"


async def _run(url: str) -> list[tuple[int, str | None]]:
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_stream(client, i, 3 if i % 3 == 0 else None) for i in range(CLIENTS)))


def test_32_streams_batched_a_third_disconnecting(live):
    engine = live.engine
    before = engine.stats()
    steps_before = before.num_steps
    results = asyncio.run(_run(live.url))
    for i, (chunks, reason) in enumerate(results):
        if i % 3 == 0:
            assert reason is None and chunks == 3
        else:
            assert reason == "length", (i, chunks, reason)
    wait_idle(engine)
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    hung_up = len(range(0, CLIENTS, 3))
    assert stats.finished.get("abort", 0) - before.finished.get("abort", 0) == hung_up
    assert stats.finished.get("length", 0) - before.finished.get("length", 0) == CLIENTS - hung_up
    assert stats.generation_tokens - before.generation_tokens < (CLIENTS - hung_up) * TOKENS + hung_up * LONG
    # batched: far fewer engine steps than one request after another would take
    assert engine.stats().num_steps - steps_before < CLIENTS * TOKENS / 2
    assert max(s.batch_size for s in engine.step_history(steps_before)) > 8
    engine.check_invariants()
