"""A fresh install works: no import name of ours shadows a package our dependencies install.

Everything runs from the repository root (`python app.py`, `python -m ...`, pytest), where the root is first on
`sys.path`: a top-level package of ours named like an installed one hides it from every library that imports it
(transformers 5.25 imports Hugging Face's `kernels`; ours was named `kernels` until it broke every model load).
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _our_top_level_names() -> set[str]:
    """What `import NAME` finds in the repository root: packages (folders with __init__.py) and modules."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    return packages | modules


def test_our_top_level_names_are_found():
    names = _our_top_level_names()
    assert {"backend", "flab_kernels", "ui", "app", "tests"} <= names


def test_no_top_level_name_of_ours_is_an_installed_distributions():
    installed = md.packages_distributions()  # top-level import name -> the distributions that install it
    clashes = {name: installed[name] for name in sorted(_our_top_level_names()) if name in installed}
    assert clashes == {}, f"these names of ours shadow installed packages when run from the repository root: {clashes}"


def test_a_dependencys_kernels_package_is_theirs_from_the_root():
    """From the root, `import kernels` (what transformers' hub-kernels integration does) finds Hugging Face's
    package where it is installed, and nothing of ours where it is not."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else 'absent')\n"
        "import transformers.integrations.hub_kernels\n"  # imports HF kernels in transformers 5.25+
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip().splitlines()[0]
    assert origin == "absent" or not Path(origin).resolve().is_relative_to(ROOT), origin
    if "kernels" in md.packages_distributions():
        assert origin != "absent"
