"""backend/tools/bench_peers.py: the report with our engine alone (absent peers named with their path), the GGUF
writer's round trip (our weights -> a BF16 GGUF -> read back by the `gguf` package and by transformers -> the same
tensors), the worker protocol and a peer environment without its peer. Slow: a real peer, where its environment
exists (FLAB_LLAMA_PYTHON / FLAB_VLLM_PYTHON, default the project cache's peers/<name>/bin/python)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend.core.errors import EngineError, UnsupportedModelError
from backend.tools import bench_peers
from backend.tools.gguf_writer import read_gguf_tensors, rotary_from_gguf, rotary_to_gguf, write_gguf
from backend.tools.peers import wire
from backend.tools.peers.process import PeerError, PeerProcess

SMALL = ["--rounds", "2", "--num-requests", "2", "--prompt-len", "16", "--new-tokens", "4"]


def test_peers_absent_are_reported_with_their_path_and_ours_is_measured(tiny_model, tmp_path, capsys):
    llama, vllm = tmp_path / "no-llama" / "python", tmp_path / "no-vllm" / "python"
    out = tmp_path / "peers.json"
    argv = ["--model", str(tiny_model("llama")), "--systems", "ours-native-torch", "llama-bf16", "llama-q4_1", "vllm"]
    argv += SMALL + ["--llama-python", str(llama), "--vllm-python", str(vllm), "--json", str(out)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = bench_peers.main(argv)  # runs with --threads 2 (the default)
        assert torch.get_num_threads() == 1  # and gives the caller its own count back
    finally:
        torch.set_num_threads(before)
    by_name = {r.spec.name: r for r in results}
    ours = by_name["ours-native-torch"]
    assert ours.ok and len(ours.rounds) == 2
    for one in ours.rounds:
        assert one.prompt_len == 16 and len(one.latency_tokens) == 4
        assert one.output_tokens > 0 and one.decode_tok_s > 0 and one.prefill_tok_s > 0 and one.bandwidth > 0
    assert ours.weight_bytes > 0 and "cpu_kernels" in ours.settings
    assert by_name["llama-bf16"].status == f"not installed: {llama}"
    assert by_name["llama-q4_1"].status == f"not installed: {llama}"
    assert by_name["vllm"].status == f"not installed: {vllm}"
    text = capsys.readouterr().out
    assert f"| not installed: {vllm} |" in text
    assert "1.00x / 1.00x / 1.00x | first 4 of 4 |" in text  # the reference against itself
    assert "16 in / 4 out" in text and "load average" in text and "copy bandwidth" in text
    saved = json.loads(out.read_text())
    assert [r["status"] for r in saved["results"]] == [r.status for r in results]
    assert saved["results"][0]["median"]["decode_tok_s"] == ours.median("decode_tok_s")
    assert saved["results"][1]["median"] == {}  # nothing measured


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_peers.main(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench_peers.main(["--systems", "ours-native-torch", "--reference", "vllm"])
    assert "--reference vllm is not among --systems" in capsys.readouterr().err


def test_the_rotary_reordering_is_llamas_and_inverts():
    heads, head_dim = 2, 4
    w = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 3)
    # per head, transformers' rows [x0 x1 | y0 y1] (halves) become GGUF's [x0 y0 x1 y1] (adjacent pairs)
    assert rotary_to_gguf(w, heads)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    v = torch.randn(6 * 8, 5)
    assert torch.equal(rotary_from_gguf(rotary_to_gguf(v, 6), 6), v)


def test_our_weights_round_trip_through_a_bf16_gguf(tiny_model, tmp_path):
    folder = tiny_model("llama")
    config = json.loads((folder / "config.json").read_text())
    path = write_gguf(folder, tmp_path / "model.gguf")
    written = read_gguf_tensors(path)
    original = load_file(str(folder / "model.safetensors"))
    if config.get("tie_word_embeddings"):
        original.pop("lm_head.weight", None)
    assert len(written) == len(original)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    for name, tensor in original.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        suffix = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
        gname = next(
            (f"blk.{layer}.{g}.weight" for h, g in suffix.items() if layer is not None and f".{h}." in name), None
        )
        if gname is None:  # norms, MLP, embeddings: checked below by value through transformers
            continue
        got = torch.from_numpy(written[gname].copy())
        if gname.endswith("attn_q.weight"):
            got = rotary_from_gguf(got, heads)
        elif gname.endswith("attn_k.weight"):
            got = rotary_from_gguf(got, kv_heads)
        assert types[gname] == "BF16"
        assert torch.equal(got, tensor.to(torch.bfloat16).float()), name
    assert all(types[n] == "F32" for n in written if n.endswith("norm.weight"))

    # transformers' own GGUF reader (an independent one) sees every tensor of the checkpoint, in bf16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16).float()), name


def test_gguf_writer_refuses_what_it_cannot_write(tiny_model, tmp_path):
    with pytest.raises(UnsupportedModelError, match="model types llama"):
        write_gguf(tiny_model("qwen3"), tmp_path / "q.gguf")
    folder = tiny_model("llama")
    other = write_gguf(folder, tmp_path / "no-tokenizer.gguf")
    with pytest.raises(EngineError, match="holds no tokenizer"):
        write_gguf(folder, tmp_path / "t.gguf", template=other)
    with pytest.raises(EngineError, match="dtype must be one of"):
        write_gguf(folder, tmp_path / "d.gguf", dtype="q4_0")
    assert not list(tmp_path.glob(".*.writing"))  # no half-written file left


def test_wire_answers_errors_and_goes_on(monkeypatch):
    requests = [
        {"op": "echo", "x": 1},
        {"op": "nope"},
        {"op": "boom"},
        {"op": "echo", "x": 2},
        {"op": "quit"},
        {"op": "echo", "x": 3},
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in requests)))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", io.StringIO())

    def boom(request: dict) -> dict:
        raise ValueError("broken")

    wire.serve({"echo": lambda r: {"x": r["x"]}, "boom": boom}, {"version": "v"})
    replies = [wire.parse_reply(line) for line in out.getvalue().splitlines()]
    assert replies[0] == {"ready": True, "version": "v"}
    assert replies[1] == {"x": 1}
    assert "unknown op 'nope'" in replies[2]["error"]
    assert replies[3] == {"error": "ValueError: broken"}
    assert replies[4] == {"x": 2} and len(replies) == 5  # nothing after quit
    assert wire.parse_reply("a library's own line") is None


def test_a_peer_environment_without_the_peer_fails_with_the_reason(tmp_path):
    peer = PeerProcess(Path(sys.executable), "llama_worker.py", {"model": "x", "threads": 1}, tmp_path / "w.log")
    with pytest.raises(PeerError, match="exited during start.*ModuleNotFoundError: No module named 'llama_cpp'"):
        peer.start(timeout_s=120)
    peer.close()


def _peer_python(name: str) -> Path:
    env = os.environ.get(f"FLAB_{name.upper()}_PYTHON")
    return Path(env) if env else bench_peers.default_peer_python(name)


@pytest.mark.slow
@pytest.mark.parametrize("peer, system", [("llama", "llama-bf16"), ("vllm", "vllm")])
def test_a_real_peer_runs_the_same_model(peer, system, smollm2_instruct, tmp_path):
    python = _peer_python(peer)
    if not python.exists():
        pytest.skip(f"{peer} is not installed: {python}")
    argv = ["--model", "smollm2-135m-instruct", "--systems", "ours-native-torch", system, f"--{peer}-python"]
    argv += [str(python), "--json", str(tmp_path / "p.json")] + SMALL
    results = {r.spec.name: r for r in bench_peers.main(argv)}
    theirs, ours = results[system], results["ours-native-torch"]
    assert theirs.ok, theirs.status
    assert theirs.version and theirs.weight_bytes > 0
    assert all(len(r.latency_tokens) == 4 and r.output_tokens > 0 for r in theirs.rounds)
    # the same weights, greedy: the first token of a random prompt is no near-tie
    assert theirs.rounds[0].latency_tokens[0] == ours.rounds[0].latency_tokens[0]
    assert np.isfinite(theirs.median("decode_tok_s"))
