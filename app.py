"""Fallback Lab: `python app.py` opens the Gradio app (module-level `demo` for Hugging Face Spaces).

python app.py [--host 0.0.0.0] [--port 7860] [--share] [--model HUB_ID_OR_FOLDER] [--api [--api-key KEY]]

With --api the OpenAI-compatible API (backend/server: /v1/completions, /v1/chat/completions, /metrics, ...)
is served beside the UI on the same port, over the engine the UI has loaded.
"""

from __future__ import annotations

import argparse
import logging
import os

from ui.callbacks import Lab
from ui.defaults import DEFAULT_CHOICE
from ui.layout import CSS, THEME, build_demo

QUEUE_CONCURRENCY = 4  # default per event; generation sets its own (streams share the engine's batch)


def make_demo(model: str | None = None, lab: Lab | None = None):
    demo = build_demo(lab or Lab(), default_model=model or os.environ.get("FLAB_MODEL") or DEFAULT_CHOICE)
    return demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY)


def make_api_app(model: str | None = None, api_key: str | None = None, served_model_name: str | None = None):
    """-> (FastAPI app with the OpenAI API routes and the UI mounted at /, its Lab). One engine: the UI's."""
    import gradio as gr

    from backend.server import build_app

    lab = Lab()
    api = build_app(lambda: lab.session.current(), served_model_name=served_model_name, api_key=api_key)
    return gr.mount_gradio_app(api, make_demo(model, lab), path="/", theme=THEME, css=CSS), lab


demo = make_demo()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fallback Lab: the interactive inference-engine lab")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument(
        "--model",
        default=None,
        help="model selected at start (Hub id or local folder); default: the built-in tiny random-weight model",
    )
    parser.add_argument(
        "--api",
        action="store_true",
        help="also serve the OpenAI-compatible API (/v1/..., /metrics) on the same port, over the UI's engine",
    )
    parser.add_argument("--api-key", default=os.environ.get("FLAB_API_KEY"), help="with --api: require this key")
    parser.add_argument(
        "--served-model-name", default=None, help="with --api: the model name clients send (default: the loaded one)"
    )
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
    if args.api:
        import uvicorn

        app, _ = make_api_app(args.model, args.api_key, args.served_model_name)
        print(f"Fallback Lab with the OpenAI API: http://{args.host}:{args.port} (API at /v1, metrics at /metrics)")
        uvicorn.run(app, host=args.host, port=args.port)
        return
    app = demo if args.model is None else make_demo(args.model)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS)


if __name__ == "__main__":
    main()
