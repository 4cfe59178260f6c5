"""The image-text benchmark end to end at tiny sizes: the report's fields, both sides' vision tower timed, the same
greedy tokens from our engine and HF generate() (nothing is timed against a bound)."""

import json

from backend.tools import bench_vlm


def test_bench_vlm_report_fields(tmp_path, capsys):
    out = tmp_path / "report.json"
    report = bench_vlm.main(
        ["--shape", "tiny", "--rounds", "2", "--new-tokens", "3", "--path", str(tmp_path / "m"), "--json", str(out)]
    )
    assert report.same_tokens
    assert report.image_tokens == (56 // 14 // 2) ** 2 and report.prompt_tokens > report.image_tokens
    for side in (report.ours, report.hf):
        assert side.ttft_ms > 0 and side.decode_tok_s > 0 and side.e2e_tok_s > 0
        assert side.vision_ms > 0 and 0 < side.vision_share <= 1  # the vision tower ran, inside the first token
        assert len(side.ttft_all_ms) == 2
    assert report.ttft_speedup > 0 and report.decode_speedup > 0
    saved = json.loads(out.read_text())
    assert saved["ours"]["ttft_ms"] == report.ours.ttft_ms and saved["rounds"] == 2
    assert "--shape tiny" in saved["command"]
    assert "vision/TTFT" in capsys.readouterr().out
