"""The MoE experts benchmark runs end to end on a small shape and reports what it measured."""

from __future__ import annotations

from backend.tools import bench_experts

SMALL = ["--hidden", "64", "--intermediate", "64", "--layers", "1", "--experts", "4", "--prompt-len", "8"]


def test_bench_experts_table(capsys):
    table = bench_experts.main(["--methods", "none", "int8", "int4", *SMALL, "--new-tokens", "4", "--dtype", "float32"])
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["full precision (float32)", "int8", "int4"]
    ratios = [float(r[1].split("(")[1].rstrip("x) ")) for r in rows]
    assert ratios[0] == 1.0 and ratios[2] < ratios[1] < 0.8  # with the experts left full precision: ~0.9
    assert rows[0][2].strip() == "no" and "1 modules, 4 experts" in rows[1][2]
    assert all(float(r[3]) > 0 for r in rows)
    assert table in capsys.readouterr().out
