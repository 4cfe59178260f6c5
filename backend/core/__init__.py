"""The engine core: Engine, its loop, scheduler, KV cache, runner, sampler and outputs."""
