"""Worker scripts of backend/tools/bench_peers.py: each runs one peer system (llama.cpp, vLLM) in that peer's own
Python environment and answers the benchmark's requests over stdin / stdout (wire.py). They import nothing of
the project, so a peer's environment needs only the peer itself."""
