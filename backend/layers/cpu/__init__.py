"""16-bit linears and MoE experts on CPU: oneDNN-prepacked weights, shared sibling products, fp32 copies."""
