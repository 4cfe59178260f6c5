"""The command line of backend/loading/tiny_vlms.py: write a random-weight image-text model with its processor.

python -m backend.tools.tiny_vlms llava /tmp/tiny-llava
"""

from __future__ import annotations

from backend.loading.tiny_vlms import FAMILIES, build_tiny_vlm, main

__all__ = ["FAMILIES", "build_tiny_vlm", "main"]

if __name__ == "__main__":
    main()
