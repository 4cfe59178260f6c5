"""Our C++ CPU kernels (csrc/): compiled on first use per instruction set (build.py), called through ops.py."""
