"""Write a random-weight checkpoint of a real architecture into a folder (backend/loading/tiny_models.py).

python -m backend.tools.tiny_models llama /tmp/tiny-llama
"""

from __future__ import annotations

import argparse

import torch

from backend.core.config import DTYPES
from backend.loading.tiny_models import ARCHS, build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", choices=sorted(ARCHS))
    parser.add_argument("path")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build_tiny_model(args.arch, args.path, seed=args.seed, dtype=getattr(torch, args.dtype))
    print(out)


if __name__ == "__main__":
    main()
