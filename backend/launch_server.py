"""The OpenAI-compatible server, with the flags of the SGLang command this project started from:

    python -m backend.launch_server --model-path meta-llama/Llama-3.2-1B-Instruct --host 0.0.0.0 --port 30000 \
        --model-impl transformers

Serves /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /health and /metrics
(Prometheus) over one engine (backend/server). Ctrl-C or SIGTERM stops it: requests in flight are aborted,
their KV blocks freed, the port released.

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

import uvicorn

from backend.config import add_engine_flags, engine_option_names, engine_options_from_args
from backend.hosting import HostingError, HostPolicy, add_hosting_flags, refuse_zerogpu

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
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_hosting_flags(p)  # the server's own --api-key stays; the policy reads it
    return p.parse_args(argv)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine options given on the command line (the rest keep EngineConfig's defaults)."""
    return engine_options_from_args(args)


class _Server(uvicorn.Server):
    """uvicorn's server; the first Ctrl-C / SIGTERM also closes the engine (in-flight requests are aborted, so
    their streams end now instead of holding the shutdown), a second Ctrl-C forces the exit."""

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            self.force_exit = sig == signal.SIGINT or self.force_exit
            return
        self.should_exit = True
        threading.Thread(target=self._on_exit, name="engine-close", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from backend import Engine
    from backend.errors import EngineError
    from backend.server import ServerLimits, build_app

    if args.max_n < 1:
        print("error: --max-n must be at least 1", file=sys.stderr)
        return 2
    try:
        refuse_zerogpu()
        policy = HostPolicy.from_env_and_flags(args)
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
        app = build_app(engine, args.served_model_name or args.model_path, None, args.chat_template, limits, policy)
    except (ValueError, OSError) as e:
        engine.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or args.model_path
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
    )
    server = _Server(config, engine.close)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"listening on http://{host}:{args.port} (OpenAI API at /v1, docs at /docs, metrics at /metrics)", flush=True)
    try:
        server.run()
    finally:
        engine.close()
    if not server.started:
        print(f"error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
