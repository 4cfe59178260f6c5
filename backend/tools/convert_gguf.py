"""Convert a GGUF file (any that transformers can read) into a safetensors checkpoint folder the engine loads.

    python -m backend.tools.convert_gguf IN.gguf OUT_DIR --dtype bfloat16

The weights are dequantized (GGUF is an import path here, not a runtime format) and written in the dtype
asked for, with the tokenizer and chat template the file carries. Needs `gguf` and `accelerate`.
"""

from __future__ import annotations

import argparse
import sys
import time

from backend.core.config import DTYPES
from backend.core.errors import EngineError
from backend.loading.gguf import ConversionProgress, convert_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("out", help="the folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def report(p: ConversionProgress) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {p.stage}", file=sys.stderr, flush=True)

    try:
        out = convert_gguf(args.gguf, args.out, dtype=args.dtype, progress=report, overwrite=args.overwrite)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
