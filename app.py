"""Fallback Lab: `python app.py` opens the Gradio app (module-level `demo` for Hugging Face Spaces).

python app.py [--host 0.0.0.0] [--port 7860] [--share] [--model HUB_ID_OR_FOLDER]
"""

from __future__ import annotations

import argparse
import os

from ui.callbacks import Lab
from ui.defaults import DEFAULT_CHOICE
from ui.layout import CSS, THEME, build_demo

QUEUE_CONCURRENCY = 4  # default per event; generation sets its own (streams share the engine's batch)


def make_demo(model: str | None = None):
    demo = build_demo(Lab(), default_model=model or os.environ.get("FLAB_MODEL") or DEFAULT_CHOICE)
    return demo.queue(default_concurrency_limit=QUEUE_CONCURRENCY)


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    app = demo if args.model is None else make_demo(args.model)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS)


if __name__ == "__main__":
    main()
