"""The line protocol between backend/tools/bench_peers.py and a peer worker (standard library only).

The benchmark starts `PYTHON worker.py '<settings JSON>'`; the worker loads its model, warms up and sends a
`ready` reply with what it runs (version, settings). Then each request is one JSON line on stdin:

    {"op": "latency", "prompt": [token ids], "max_tokens": 128}
        -> {"ttft_s": time to the first token, "total_s": time to the last, "tokens": [generated ids]}
    {"op": "throughput", "prompts": [[ids], ...], "max_tokens": [n, ...]}
        -> {"seconds": wall time for all, "output_tokens": generated in all, "tokens": [[ids], ...]}
    {"op": "quit"}

A reply is one stdout line starting with REPLY_PREFIX (libraries print their own lines to stdout too; the
benchmark skips those): the JSON of the result, or {"error": "..."} when the request failed (the worker goes on).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable

REPLY_PREFIX = "@@flab-peer "

Handler = Callable[[dict], dict]


def reply(payload: dict) -> None:
    sys.stdout.write(REPLY_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


def parse_reply(line: str) -> dict | None:
    """The payload of a reply line; None for any other line."""
    if not line.startswith(REPLY_PREFIX):
        return None
    return json.loads(line[len(REPLY_PREFIX) :])


def serve(handlers: dict[str, Handler], ready: dict) -> None:
    """Send `ready`, then answer requests from stdin until `quit` or end of input."""
    reply({"ready": True, **ready})
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            break
        handler = handlers.get(op)
        if handler is None:
            reply({"error": f"unknown op {op!r}; known: {', '.join(sorted(handlers))}, quit"})
            continue
        try:
            reply(handler(request))
        except Exception as e:  # one failed request is reported; the worker stays up for the next
            traceback.print_exc(file=sys.stderr)
            reply({"error": f"{type(e).__name__}: {e}"})


def settings_from_argv() -> dict:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} '<settings JSON>'")
    return json.loads(sys.argv[1])
