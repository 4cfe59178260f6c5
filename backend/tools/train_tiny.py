"""Train the small Llama of backend/loading/train_tiny.py (the built-in tiny:trained).

python -m backend.tools.train_tiny   # into the project's cache (backend/paths.py): the built-in tiny:trained
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from backend.loading.builtin import TRAINED, builtin_path
from backend.loading.train_tiny import INFO_FILE, TrainConfig, ensure_trained, train


def default_dir() -> Path:
    """Where the built-in `tiny:trained` lives (backend/loading/builtin.py): the project's cache."""
    return builtin_path(TRAINED)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default: the project's cache (the built-in tiny:trained)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--force", action="store_true", help="train again even if the folder is up to date")
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps)
    path = train(args.out or default_dir(), cfg).path if args.force else ensure_trained(args.out or default_dir(), cfg)
    print(path, json.loads((Path(path) / INFO_FILE).read_text()))


if __name__ == "__main__":
    main()
