"""Write the remote-code example model (random weights + a tokenizer) to a folder, or a twin that breaks a rule.

    python -m examples.remote_code_model.build OUT                              # the correct model
    python -m examples.remote_code_model.build OUT --broken no-attention-backend  # forgets rule 2
    python -m examples.remote_code_model.build OUT --broken no-kwargs             # forgets rule 1

The folder holds config.json (with `auto_map` pointing at the shipped .py files), the two modeling files,
model.safetensors and a tokenizer, like a Hub repo that needs `trust_remote_code=True`. A broken twin is the
same folder with one line of modeling_flab.py changed (see README.md next to this file).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script from this folder: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.loading.tiny_models import build_remote_code_model  # noqa: E402

MODELING_FILE = "modeling_flab.py"


@dataclass(frozen=True)
class Breakage:
    """One rule forgotten: the line of modeling_flab.py as shipped and the line the twin has instead."""

    rule: str
    line: str
    broken_line: str


BREAKAGES: dict[str, Breakage] = {
    "no-attention-backend": Breakage(
        "the PreTrainedModel class sets `_supports_attention_backend = True`",
        "    _supports_attention_backend = True\n",
        "    # _supports_attention_backend = True  (forgotten)\n",
    ),
    "no-kwargs": Breakage(
        "the attention module passes **kwargs down to the attention function",
        "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling, **kwargs)\n",
        "        out, _ = attention_interface(self, q, k, v, None, scaling=self.scaling)  # **kwargs forgotten\n",
    ),
}
CHOICES = ("none", *BREAKAGES)


def build(out: str | Path, broken: str = "none", seed: int = 0) -> Path:
    """Write the model to `out` (created if missing) and return its path; `broken` names a twin (CHOICES)."""
    if broken not in CHOICES:
        raise ValueError(f"broken must be one of {CHOICES}, got {broken!r}")
    path = build_remote_code_model(out, seed=seed)
    if broken != "none":
        breakage = BREAKAGES[broken]
        modeling = path / MODELING_FILE
        text = modeling.read_text()
        if text.count(breakage.line) != 1:  # the modeling file changed: the twin would silently be the same model
            raise RuntimeError(f"{MODELING_FILE} no longer has exactly one line {breakage.line.strip()!r}")
        modeling.write_text(text.replace(breakage.line, breakage.broken_line))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.remote_code_model.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="folder to write (created if missing)")
    parser.add_argument("--broken", default="none", choices=CHOICES, help="write a twin that forgets one rule")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = build(args.out, args.broken, args.seed)
    what = "the model" if args.broken == "none" else f"a twin that forgets: {BREAKAGES[args.broken].rule}"
    print(f"wrote {what} to {path}")
    print(f"load it: Engine({str(path)!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
