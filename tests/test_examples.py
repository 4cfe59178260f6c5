"""The examples a newcomer copies from (examples/*.py): each runs as a user types it, and says what it should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import free_port, start_server_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REAL_MODEL = "smollm2-135m-instruct"


def run_example(script: str, *args: str, cwd: Path = ROOT, timeout: float = 300) -> str:
    """Run `python <script> args` from `cwd` (the repository root: examples/<script>); returns stdout."""
    path = f"examples/{script}" if cwd == ROOT else script
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, path, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_quickstart_real_model(smollm2_instruct):
    out = run_example("quickstart.py")
    assert f"loaded {REAL_MODEL}" in out and "native implementation" in out
    answers = re.findall(r"^A: (.*)$", out, re.M)
    assert len(answers) == 3
    assert "Paris" in answers[0]  # a real instruct model answers the question
    assert "4" in answers[2]
    stream = out.split("== stream:\n", 1)[1].split("\n== stats:", 1)[0]
    deltas = int(re.search(r"\((\d+) deltas\)", stream).group(1))
    assert 1 <= deltas <= 24 and len(stream.strip()) > 20
    steps, prompt_tokens, generated = map(
        int, re.search(r"steps (\d+), prompt tokens (\d+), generated (\d+)", out).groups()
    )
    assert steps >= deltas and prompt_tokens > 0 and generated >= deltas
    assert re.search(r"KV blocks 0/\d+ used", out)  # every request finished: its blocks were freed


def test_quickstart_from_its_folder(tiny_model):
    out = run_example("quickstart.py", "--model", str(tiny_model("llama")), "--max-new-tokens", "4", cwd=EXAMPLES)
    assert len(re.findall(r"^A: .*\((\d+) tokens, (stop|length)\)$", out, re.M)) == 3
    assert "== stats:" in out and "preemptions 0" in out


def check_compare_output(out: str, n_tokens: int) -> None:
    assert "3/3 prompts gave identical greedy tokens" in out
    assert out.count("same tokens") == 3
    rows = re.findall(r"^\s*(native|transformers)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert [r[0] for r in rows] == ["native", "transformers"]
    assert all(float(r[3]) > 0 for r in rows)
    token_lists = re.findall(r"^\s*(?:native|transformers): \[([\d, ]+)\]", out, re.M)
    assert len(token_lists) == 6 and all(len(t.split(",")) == n_tokens for t in token_lists)


@pytest.mark.slow  # two fp32 loads of the real model (~1 min on 2 cores); the tiny run below is the default check
def test_compare_impls_real_model(smollm2_instruct):
    out = run_example("compare_impls.py", "--max-new-tokens", "6")
    assert "transformers.models.llama.modeling_llama.LlamaForCausalLM" in out
    check_compare_output(out, 6)


def test_compare_impls_from_its_folder(tiny_model):
    out = run_example("compare_impls.py", "--model", str(tiny_model("qwen3")), "--max-new-tokens", "5", cwd=EXAMPLES)
    check_compare_output(out, 5)


def test_openai_client_without_server_skips_cleanly():
    port = free_port()
    for cwd in (ROOT, EXAMPLES):
        out = run_example("openai_client.py", "--base-url", f"http://127.0.0.1:{port}/v1", cwd=cwd, timeout=60)
        assert f"no server is listening at http://127.0.0.1:{port}/v1" in out
        assert "python -m backend.launch_server" in out


def test_openai_client_against_launch_server(smollm2_instruct):
    port = free_port()
    args = ["--model-path", REAL_MODEL, "--num-kv-blocks", "64", "--log-level", "warning"]
    server = start_server_process(args, port, ready_timeout=180)
    try:
        out = run_example("openai_client.py", "--base-url", f"http://127.0.0.1:{port}/v1", "--max-tokens", "12")
    finally:
        server.stop()
    assert f"serves {REAL_MODEL!r}" in out
    chat = re.search(r"^== chat: (.*)$", out, re.M).group(1)
    assert "Paris" in chat
    prompt_tokens, completion = map(int, re.search(r"usage: (\d+) prompt \+ (\d+) completion", out).groups())
    assert prompt_tokens > 5 and 1 <= completion <= 12
    chunks = int(re.search(r"\((\d+) chunks\)", out).group(1))
    assert 1 <= chunks <= 12
