"""The OpenAI-compatible server, with the flags of the SGLang command this project started from:

    python -m backend.launch_server --model-path meta-llama/Llama-3.2-1B-Instruct --host 0.0.0.0 --port 30000 \
        --model-impl transformers

Serves /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health and /metrics
(Prometheus) over one engine (backend/server). Ctrl-C or SIGTERM stops it: requests in flight are aborted,
their KV blocks freed, the port released, exit status 0. Exit 3: the engine can never serve again (its
tensor-parallel group is down), for a supervisor to restart it. Idle connections, request heads and bodies are
bounded in time (--timeout-*; docs/hosting.md).

Hosting (backend/hosting/policy.py): a non-loopback --host (or --hosted) gets the hosted caps (max new tokens,
prompt tokens, parallel sequences per client, body size) and /health, /metrics behind --api-key; remote code
runs only with --allow-remote-code (or --trust-remote-code, the same). The settings are printed at start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import uvicorn

from backend.core.config import add_engine_flags, engine_option_names, engine_options_from_args
from backend.hosting import HostingError, HostPolicy, add_hosting_flags, refuse_zerogpu
from backend.hosting.timeouts import ConnectionTimeouts, uvicorn_options

logger = logging.getLogger("backend.launch_server")

DEFAULT_PORT = 30000  # as SGLang's
MODEL_OPTIONS = ["model_impl", "quantization", "dtype", "device", "trust_remote_code", "revision"]  # the model group
GRACEFUL_SHUTDOWN_S = 10  # after the engine is closed, streams end at once; this bounds any other connection


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m backend.launch_server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument(
        "--model-path", "--model", dest="model_path", required=True,
        help="Hub id, local checkpoint folder, or a built-in model name (passed to Engine as it is)",
    )  # fmt: skip
    add_engine_flags(m, MODEL_OPTIONS)
    e = p.add_argument_group("engine (EngineConfig options; each flag's default is the engine's)")
    add_engine_flags(e, [n for n in engine_option_names() if n not in MODEL_OPTIONS])
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    s.add_argument(
        "--served-model-name", default=None,
        help="the model name clients send and /v1/models lists (default: --model-path)",
    )  # fmt: skip
    s.add_argument(
        "--chat-template", default=None,
        help="Jinja chat template (a file or the template itself) used instead of the tokenizer's",
    )  # fmt: skip
    s.add_argument(
        "--api-key", default=os.environ.get("FLAB_API_KEY"),
        help="require 'Authorization: Bearer <key>' on the API (env FLAB_API_KEY); /health and /metrics too "
        "when hosted, unless --public-health / --public-metrics",
    )  # fmt: skip
    s.add_argument("--max-n", type=int, default=16, help="largest n (choices per prompt) a request may ask")
    d = ConnectionTimeouts()
    s.add_argument(
        "--timeout-keep-alive", type=float, default=d.keep_alive_s, metavar="S",
        help=f"close a keep-alive connection idle this long after a response (default {d.keep_alive_s:g})",
    )  # fmt: skip
    s.add_argument(
        "--timeout-request-head", type=float, default=d.head_s, metavar="S",
        help="close a connection whose request line and headers have not arrived this long after it opened or "
        f"its last response ended (default {d.head_s:g})",
    )  # fmt: skip
    s.add_argument(
        "--timeout-request-body", type=float, default=d.body_s, metavar="S",
        help=f"answer 408 and close when a request body has not arrived whole within this (default {d.body_s:g})",
    )  # fmt: skip
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_hosting_flags(p)  # the server's own --api-key stays; the policy reads it
    return p.parse_args(argv)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine options given on the command line (the rest keep EngineConfig's defaults)."""
    return engine_options_from_args(args)


EXIT_ENGINE_DOWN = 3  # the engine can never serve again (its tensor-parallel group is down): restart the process
WATCH_EVERY_TICKS = 10  # uvicorn ticks every 0.1 s: the engine's health is read once a second


class _Server(uvicorn.Server):
    """uvicorn's server over one engine. The first Ctrl-C / SIGTERM also starts closing the engine (in-flight
    requests are aborted, so their streams end now instead of holding the shutdown); a second Ctrl-C forces the
    exit. Once a second it reads the engine's health: when the engine can never serve again (a tensor-parallel
    group down) it logs why and stops with `exit_code` EXIT_ENGINE_DOWN, so a supervisor restarts it.

    `close_engine()` returns only once the engine is closed, its step loop joined included: a thread still inside
    torch when the interpreter exits aborts the process ("terminate called without an active exception", 134)."""

    def __init__(self, config: uvicorn.Config, engine, fatal_problem: Callable[[object], str | None]) -> None:
        """`fatal_problem(engine)`: why the engine can never serve again, or None (backend/server/health.py)."""
        super().__init__(config)
        self.engine = engine
        self._fatal_problem = fatal_problem
        self.exit_code = 0
        self._closer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            self.force_exit = sig == signal.SIGINT or self.force_exit
            return
        self.should_exit = True
        self._closer = threading.Thread(target=self.engine.close, name="engine-close", daemon=True)
        self._closer.start()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if counter % WATCH_EVERY_TICKS == 0:
            problem = self._fatal_problem(self.engine)
            if problem is not None:
                logger.error("%s; it cannot recover: stopping the server (exit %d)", problem, EXIT_ENGINE_DOWN)
                self.exit_code = EXIT_ENGINE_DOWN
                return True
        return False

    def close_engine(self) -> None:
        """Close the engine and wait until it is closed, whoever started closing it."""
        if self._closer is not None:
            self._closer.join()
        self.engine.close()  # idempotent; closes it here when no signal did


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from backend import Engine
    from backend.core.errors import EngineError
    from backend.server import ServerLimits, build_app
    from backend.server.health import fatal_problem

    if args.max_n < 1:
        print("error: --max-n must be at least 1", file=sys.stderr)
        return 2
    try:
        refuse_zerogpu()
        policy = HostPolicy.from_env_and_flags(args)
        timeouts = ConnectionTimeouts(args.timeout_request_head, args.timeout_keep_alive, args.timeout_request_body)
    except HostingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("hosting policy:\n  " + "\n  ".join(policy.summary()), flush=True)
    try:
        # the host names the model itself: any folder of theirs loads; the policy's caps are for the clients
        options = dict(engine_options(args), trust_remote_code=policy.allow_remote_code)
        engine = Engine(args.model_path, **options, **policy.engine_options())
    except EngineError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        limits = ServerLimits(max_n=args.max_n, max_choices=max(args.max_n, ServerLimits.max_choices))
        name = args.served_model_name or args.model_path
        app = build_app(engine, name, None, args.chat_template, limits, policy, timeouts)
    except (ValueError, OSError) as e:
        engine.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"Fallback Lab server: {name!r} with the {engine.model_impl} implementation "
        f"(asked: {engine.config.model_impl}), "
        f"context {engine.max_model_len} tokens, {engine.stats().kv_blocks_total} KV blocks",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="off",
        proxy_headers=False,  # the policy's --forwarded-allow-ips decides (backend/hosting/proxies.py)
        **uvicorn_options(timeouts),  # idle and slow connections are closed (backend/hosting/timeouts.py)
    )
    server = _Server(config, engine, fatal_problem)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"listening on http://{host}:{args.port} (OpenAI API at /v1, docs at /docs, metrics at /metrics)", flush=True)
    try:
        server.run()
    finally:
        server.close_engine()
    if not server.started:
        print(f"error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    if server.exit_code:
        print(f"server stopped: the engine cannot serve (exit {server.exit_code})", file=sys.stderr, flush=True)
        return server.exit_code
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
