"""Tools around the engine: benchmarks, tiny-model builder, training, quantized test-checkpoint export."""
