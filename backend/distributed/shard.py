"""One rank's model: load the whole checkpoint, cut it to the rank's part, then the CPU-linear swap and the
hooks, then (transformers) the KV layout probe again, which now reports the rank's own heads.

Every rank runs `load_rank` with the same config; the only collectives are in `probe`, which all ranks run
together (group.py orders it after every rank has loaded and sharded)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from backend.core.config import EngineConfig
from backend.distributed.comm import TPContext
from backend.distributed.hf_plan import shard_transformers
from backend.distributed.hooks import install_hooks
from backend.distributed.native import shard_native
from backend.loading.build import LoadedModel, _swap_cpu_linears, load_model


@dataclass
class RankShard:
    """What one rank holds (for describe and the benchmark)."""

    rank: int
    device: str
    weights_bytes: int
    summary: dict = field(default_factory=dict)
    kv_cache_bytes: int = 0  # set once the KV caches are allocated

    def as_dict(self) -> dict:
        return dict(
            rank=self.rank,
            device=self.device,
            weights_bytes=self.weights_bytes,
            kv_cache_bytes=self.kv_cache_bytes,
            **self.summary,
        )


def rank_config(cfg: EngineConfig, rank: int) -> EngineConfig:
    """The config a rank loads with: its own device (cuda:<rank> on GPUs), 16-bit CPU linears swapped after sharding,
    and the torch path (our C++ CPU kernels wrap modules the sharding rules would no longer recognise)."""
    device = f"cuda:{rank}" if cfg.torch_device.type == "cuda" else cfg.device
    return replace(cfg, device=device, cpu_linear="none", cpu_kernels="torch")


def load_rank(cfg: EngineConfig, ctx: TPContext, progress=None) -> tuple[LoadedModel, dict]:
    """Load and shard (no collectives yet; the hooks are installed); returns the model and the rank's summary."""
    loaded = load_model(rank_config(cfg, ctx.rank), progress)
    model = loaded.model
    if loaded.impl == "native":
        hooks, summary = shard_native(model, ctx)
    else:
        hooks, summary = shard_transformers(model, ctx)
    kind, count = _swap_cpu_linears(model, cfg.cpu_linear, loaded.device, loaded.dtype)
    loaded.cpu_linear, loaded.num_cpu_linears = kind, count
    install_hooks(model, hooks)
    return loaded, summary


def probe(loaded: LoadedModel) -> None:
    """The KV layout of the sharded model (a forward with collectives: every rank at once)."""
    if loaded.impl == "transformers":
        loaded.model.probe_kv_layout(loaded.device)


def rank_shard(loaded: LoadedModel, ctx: TPContext, summary: dict) -> RankShard:
    return RankShard(ctx.rank, str(loaded.device), loaded.weights_bytes, summary)
