"""Call the engine's OpenAI-compatible server with the official `openai` client.

Start a server first (another terminal):

    python -m backend.launch_server --model-path smollm2-135m-instruct --port 30000

then:

    python examples/openai_client.py                                  # http://127.0.0.1:30000/v1
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --api-key KEY

With no server listening it says so and exits cleanly (status 0). Runs from the repository root or examples/.
"""

from __future__ import annotations

import argparse
import socket
import sys
from urllib.parse import urlsplit

import openai

DEFAULT_BASE_URL = "http://127.0.0.1:30000/v1"  # launch_server's default port, as SGLang's


def server_listening(base_url: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at the URL's host and port."""
    url = urlsplit(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL)
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it was started with one")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    if not server_listening(args.base_url):
        print(f"no server is listening at {args.base_url}: nothing to call.")
        print("start one with: python -m backend.launch_server --model-path smollm2-135m-instruct --port 30000")
        return

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    print(f"server at {args.base_url} serves {model!r}")

    # a chat completion (the server applies the model's chat template)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=args.max_tokens,
        temperature=0.0,
    )
    print(f"\n== chat: {chat.choices[0].message.content!r}")
    print(f"usage: {chat.usage.prompt_tokens} prompt + {chat.usage.completion_tokens} completion tokens")

    # a streamed completion: one chunk per engine step
    print("\n== stream:")
    chunks = 0
    stream = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=args.max_tokens, temperature=0.0, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
            chunks += 1
    print(f"\n({chunks} chunks)")


if __name__ == "__main__":
    try:
        main()
    except openai.APIError as e:  # the server answered with an error: say what it was, not a traceback
        print(f"the server refused the request: {e}", file=sys.stderr)
        sys.exit(1)
