"""Loading: from a name to a model in memory (Hub, local folders, built-in models, safetensors, memory estimate)."""
