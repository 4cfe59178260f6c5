"""The workshop notebook (examples/workshop.ipynb): committed without outputs, and runs top to bottom."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "workshop.ipynb"
SKIP_DIRS = {".git", ".cache", "shared", ".ipynb_checkpoints", "node_modules"}


def committed_notebooks() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.ipynb") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


def cells_with_outputs(path: Path) -> list[str]:
    """The code cells of a notebook file that carry outputs or an execution count."""
    nb = nbformat.read(path, as_version=4)
    return [
        f"{path.name} cell {i}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]


def test_notebooks_are_committed_without_outputs():
    notebooks = committed_notebooks()
    assert NOTEBOOK in notebooks
    carrying = [c for path in notebooks for c in cells_with_outputs(path)]
    assert not carrying, f"strip the outputs (jupyter nbconvert --clear-output --inplace FILE): {carrying}"


def test_output_check_finds_an_executed_cell(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index, cell = next((i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    cell.execution_count = 1
    nbformat.write(nb, tmp_path / "run.ipynb")
    assert cells_with_outputs(tmp_path / "run.ipynb") == [f"run.ipynb cell {index}"]


def cell_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(str(out.data.get("text/plain", "")))
    return "".join(parts)


NOISE = ("it/s]", "%|", "TqdmWarning", "IProgress", "Writing model shards", "Loading weights", "deprecated", "Warning:")


def noisy_outputs(nb) -> list[str]:
    """What a reader should not see in an executed notebook: anything written to stderr (warnings, logged
    errors), raw tqdm bars, progress lines of transformers, deprecation notes."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stderr":
                found.append(f"cell {i} stderr: {out.text[:200]!r}")
        text = cell_text(cell)
        found += [f"cell {i}: {word!r} in {text[:200]!r}" for word in NOISE if word in text]
    return found


def test_noise_check_finds_a_tqdm_bar_and_a_warning():
    nb = nbformat.v4.new_notebook()
    bar = nbformat.v4.new_output("stream", name="stderr", text="\rLoading weights:  17%|█▋  | 45/272 [00:00<00:00]")
    warn = nbformat.v4.new_output("stream", name="stdout", text="FutureWarning: x is deprecated\n")
    clean = nbformat.v4.new_output("stream", name="stdout", text="30 calls for 30 layers\n")
    nb.cells = [nbformat.v4.new_code_cell(outputs=[bar]), nbformat.v4.new_code_cell(outputs=[warn, clean])]
    found = noisy_outputs(nb)
    assert any(f.startswith("cell 0 stderr") for f in found) and any("deprecated" in f for f in found)
    nb.cells = nb.cells[1:]
    nb.cells[0].outputs = [clean]
    assert noisy_outputs(nb) == []


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec for this very interpreter (the default `python3` spec runs whatever `python` is on PATH)."""
    from ipykernel.kernelspec import install

    install(kernel_name="flab-workshop", prefix=str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    return "flab-workshop"


def test_workshop_notebook_runs_top_to_bottom(kernel_name, smollm2_instruct, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("FLAB_NOTEBOOK_CI", "1")  # the last cell closes the app it launched
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name=kernel_name, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first cell that fails
    assert noisy_outputs(nb) == []  # no progress bars, warnings or deprecation notes in any cell's output
    out = "\n".join(cell_text(c) for c in nb.cells if c.cell_type == "code")
    # 1. the spy attention saw every layer; the engine's function is registered; both twins are refused
    assert "30 calls for 30 layers" in out
    assert "registered: fallback_lab_attention" in out
    assert "none: runs, transformers implementation" in out
    assert "no-attention-backend: refused:" in out and "_supports_attention_backend = True" in out
    assert "no-kwargs: refused:" in out and "must pass the forward **kwargs down" in out
    assert "without trust_remote_code=True:" in out
    # 2. the KV cache: shared prefix blocks, freed at the end
    assert "shared: [0, 1]" in out and "after both finished: 0 blocks used" in out
    assert "The capital of France is Paris." in out
    # 3. chunked prefill under a 16-token budget and preemption with the same tokens
    assert "step 0: batch 2, 16 prefill + 0 decode tokens" in out
    assert "same tokens as with enough blocks: True" in out and "preemptions: 0;" not in out
    # 4. native and transformers agree
    assert "identical greedy tokens: True" in out
    # 5. quantization rows
    for quant in ("fp32", "int8", "int4", "fp8"):
        assert f"{quant}: weights" in out
    # 6. the app's figures were drawn (plotly JSON outputs)
    figures = [
        o for c in nb.cells for o in c.get("outputs", []) if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert len(figures) == 4
    # 7. images: placeholder expansion, the merge, M-RoPE positions, the blocks that hold the image
    assert "the image: 1x4x4 patches of 14 px (t, h, w), merged 2x2 -> 4 image tokens" in out
    assert "the engine's rows == the model's own get_image_features: True" in out
    assert "7  8  7   <- image" in out and "sits at i + (-2)" in out
    assert "blocks holding image features: [1, 2]" in out
    assert (
        "flipped picture: 0 (the block hashes cover the pixels)" in out
        and "same ids, different outputs: True True" in out
    )
    # 8. the app launched and was closed
    assert "the app is at http://127.0.0.1:" in out and "closed (notebook test)" in out
