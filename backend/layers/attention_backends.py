"""Attention backends: how the one paged attention layer stores K/V and attends, by name.

A backend does two things: `prepare` the step's metadata once (before the forward; every layer reads it
from the ForwardBatch) and, per layer call, `store` the new K/V into the paged cache and `attend` over it.
The engine chooses one backend when it starts (`engine_kernel_settings`: "auto" is triton on CUDA or with
FLAB_FORCE_TRITON=1, torch elsewhere) and every step uses it; that choice is also the one dispatch rule of every
other op of the engine (flab_kernels/dispatch.py): the triton backend's engine runs the Triton norm, rotary and
activation kernels, the torch backend's the torch math.

    torch   the CPU path and the reference: a per-step plan of block gathers (flab_kernels/attention_torch.py);
            with the engine's C++ CPU kernels loaded (EngineConfig.cpu_kernels "fused"), decode-only steps and the
            decode rows of steps with prefill read the paged K/V in place through our paged decode kernel (the
            prefills keep the plan) and K/V rows are stored in one call
            (flab_kernels/cpu/ops.py), for both implementations (native layers and the injected HF attention)
    triton  the CUDA kernels (flab_kernels/kv_store.py, flab_kernels/paged_attention.py, flab_kernels/paged_decode.py)
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from types import ModuleType
from typing import ClassVar

import torch

from flab_kernels.attention_args import PagedAttentionArgs
from flab_kernels.attention_torch import (
    TorchAttentionPlan,
    build_plan,
    paged_attention_planned,
    paged_attention_torch,
    store_kv_torch,
)
from flab_kernels.cpu import ops as cpu_ops
from flab_kernels.dispatch import KernelSettings, current


class AttentionBackend:
    name: ClassVar[str]
    pads_head_dims: ClassVar[bool] = False  # K and V stored at one (padded) head size per cache slot

    def __init__(self, compute_dtype: torch.dtype | None = None, cpu_kernels: ModuleType | None = None) -> None:
        self.compute_dtype = compute_dtype  # the attention math dtype (None = the model's)
        # the loaded C++ CPU kernels (flab_kernels/cpu/build.py) when the engine runs them (cpu_kernels "fused"):
        # the torch backend's decode-only steps use them; None: the backend's own path only
        self.cpu_kernels = cpu_kernels

    def prepare(
        self, query_start_loc: list[int], seq_lens: list[int], block_tables: torch.Tensor, block_size: int
    ) -> object | None:
        """The step's backend-specific metadata (stored as ForwardBatch.attn_metadata)."""
        return None

    def store(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
    ) -> None:
        raise NotImplementedError  # pragma: no cover - every registered backend implements it

    def attend(self, args: PagedAttentionArgs, metadata: object | None) -> torch.Tensor:  # (T, Hq, Dv)
        raise NotImplementedError  # pragma: no cover - every registered backend implements it


@dataclasses.dataclass(frozen=True)
class DecodeRows:
    """The decode rows of a step with prefill: their token indices and their sequences' block tables and lengths."""

    tokens: torch.Tensor  # (Sd,) int64
    block_tables: torch.Tensor  # (Sd, MB) int32
    seq_lens: torch.Tensor  # (Sd,) int32


@dataclasses.dataclass
class TorchStep:
    """The torch backend's metadata of one step: whether its attention calls run our C++ paged decode kernel
    (chosen once per step, the kernels loaded: `cpu_decode`, one new token per sequence; `cpu_mixed`, a step with
    prefill whose decode rows the kernel takes while the prefills run the plan) and the plans of block gathers
    (built in `prepare` for a step without the kernel, else on first use: a call the kernel does not take)."""

    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: torch.Tensor  # (S, MB) int32
    block_size: int
    compute_dtype: torch.dtype | None
    cpu_decode: bool
    cpu_mixed: bool = False

    @cached_property
    def plan(self) -> TorchAttentionPlan:
        return build_plan(self.query_start_loc, self.seq_lens, self.block_tables, self.block_size, self.compute_dtype)

    @cached_property
    def prefill_plan(self) -> TorchAttentionPlan:  # the prefill sequences only
        qsl, bt, bs = self.query_start_loc, self.block_tables, self.block_size
        return build_plan(qsl, self.seq_lens, bt, bs, self.compute_dtype, decode=False)

    @cached_property
    def decode_rows(self) -> DecodeRows:
        qsl = self.query_start_loc
        seqs = [i for i in range(len(self.seq_lens)) if qsl[i + 1] - qsl[i] == 1]
        device = self.block_tables.device
        ids = torch.tensor(seqs, dtype=torch.long, device=device)
        return DecodeRows(
            torch.tensor([qsl[i] for i in seqs], dtype=torch.long, device=device),
            self.block_tables.index_select(0, ids).contiguous(),
            torch.tensor([self.seq_lens[i] for i in seqs], dtype=torch.int32, device=device),
        )


def cpu_decode_takes(args: PagedAttentionArgs) -> bool:
    """Whether our C++ paged decode kernel computes this call as the torch path does: a decode-only call without
    bidirectional spans that `cpu_decode_rows_take`."""
    return args.max_query_len == 1 and not args.bidirectional and cpu_decode_rows_take(args)


def cpu_decode_rows_take(args: PagedAttentionArgs) -> bool:
    """Whether the kernel computes this call's decode rows as the torch path does: on CPU, bf16 / fp32 q of the
    caches' dtype, K and V cached at q's head size (a slot padded to one head size, KVSlot.padded, arrives here
    zero-padded: the same products), contiguous caches, sinks one per query head. Sliding window, softcap and sinks
    as flab_kernels/attention_torch.py; bidirectional spans belong to prefill sequences."""
    q, kc, vc = args.q, args.k_cache, args.v_cache
    return (
        q.device.type == "cpu"
        and q.dtype in cpu_ops.PACKED_DTYPES
        and kc.dtype == q.dtype
        and vc.dtype == q.dtype
        and kc.shape[-1] == q.shape[-1]
        and vc.shape[-1] == q.shape[-1]
        and kc.is_contiguous()
        and vc.is_contiguous()
        and (args.sinks is None or args.sinks.numel() == q.shape[1])
    )


def _rows(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor | None:  # (T, H, D) -> (T, H * D) view, or None
    """x as the rows the one-call K/V store copies (each token's heads adjacent, the cache's dtype), else None."""
    if x.dtype != cache.dtype or x.device.type != "cpu" or x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        return None
    return x.view(x.shape[0], -1)


class TorchAttention(AttentionBackend):
    name = "torch"

    def prepare(self, query_start_loc, seq_lens, block_tables, block_size):
        kernels = self.cpu_kernels is not None
        decode = kernels and len(seq_lens) == query_start_loc[-1]  # one new token each
        mixed = kernels and not decode and any(b - a == 1 for a, b in zip(query_start_loc, query_start_loc[1:]))
        step = TorchStep(query_start_loc, seq_lens, block_tables, block_size, self.compute_dtype, decode, mixed)
        if not decode:  # built before the forward, as every backend prepares its step
            _ = (step.prefill_plan, step.decode_rows) if mixed else step.plan
        return step

    def store(self, k, v, k_cache, v_cache, slots):
        ext = self.cpu_kernels
        if ext is not None and k_cache.is_contiguous() and v_cache.is_contiguous():
            k_rows, v_rows = _rows(k, k_cache), _rows(v, v_cache)
            if k_rows is not None and v_rows is not None:
                cpu_ops.store_kv(ext, k_rows, v_rows, k_cache, v_cache, slots)  # one call, rows copied
                return
        store_kv_torch(k, v, k_cache, v_cache, slots)

    def attend(self, args, metadata):
        a = args
        if metadata.cpu_decode and cpu_decode_takes(a):
            return cpu_ops.paged_decode(
                self.cpu_kernels, a.q, a.k_cache, a.v_cache, a.block_tables, a.seq_lens, a.scale, a.softcap,
                a.sliding_window, a.sinks,
            )  # fmt: skip
        if metadata.cpu_mixed and cpu_decode_rows_take(a):  # the prefills on the plan, the decode rows on the kernel
            out = paged_attention_planned(
                a.q, a.k_cache, a.v_cache, metadata.prefill_plan, a.scale, a.softcap, a.sliding_window, a.sinks,
                a.bidirectional,
            )  # fmt: skip
            rows = metadata.decode_rows
            decoded = cpu_ops.paged_decode(
                self.cpu_kernels, a.q.index_select(0, rows.tokens), a.k_cache, a.v_cache, rows.block_tables,
                rows.seq_lens, a.scale, a.softcap, a.sliding_window, a.sinks,
            )  # fmt: skip
            return out.index_copy_(0, rows.tokens, decoded)
        return paged_attention_planned(
            a.q, a.k_cache, a.v_cache, metadata.plan, a.scale, a.softcap, a.sliding_window, a.sinks, a.bidirectional
        )


class TritonAttention(AttentionBackend):
    name = "triton"
    pads_head_dims = True

    def store(self, k, v, k_cache, v_cache, slots):
        from flab_kernels.kv_store import store_kv_triton

        store_kv_triton(k, v, k_cache, v_cache, slots)

    def attend(self, args, metadata):
        from flab_kernels.ops import paged_attention_triton

        if args.bidirectional:  # spans of bidirectional attention (Gemma 3's images): the torch path honours them
            a = args
            return paged_attention_torch(
                a.q, a.k_cache, a.v_cache, a.query_start_loc, a.seq_lens, a.block_tables, a.scale, a.softcap,
                a.sliding_window, a.sinks, a.bidirectional,
            )  # fmt: skip

        return paged_attention_triton(dataclasses.replace(args, q=args.q.contiguous()))


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {b.name: b for b in (TorchAttention, TritonAttention)}


def resolve_attention_backend(requested: str, device: torch.device, force_triton: bool = False) -> str:
    """ "auto" -> triton on CUDA (or anywhere with FLAB_FORCE_TRITON=1), torch elsewhere; a registered name as it is."""
    if requested == "auto":
        return "triton" if device.type == "cuda" or force_triton else "torch"
    return requested


def engine_kernel_settings(requested: str, device: torch.device) -> KernelSettings:
    """The kernel settings of an engine, read from the environment once at its start (ValueError for a typo), with
    the one dispatch rule decided: every op of the engine runs the kernels of its attention backend (Triton for
    the triton backend, the torch math for the torch backend)."""
    settings = KernelSettings.from_env()
    name = resolve_attention_backend(requested, device, settings.force_triton)
    return dataclasses.replace(settings, triton=name == "triton")


def make_attention_backend(
    requested: str, device: torch.device, compute_dtype=None, cpu_kernels: ModuleType | None = None
) -> AttentionBackend:
    """The backend the settings in effect chose (inside an engine: `engine_kernel_settings`); `cpu_kernels`: the
    loaded C++ CPU kernels when the engine runs them (the torch backend's decode-only steps use them)."""
    settings = current()
    if settings.triton is not None and requested == "auto":
        return ATTENTION_BACKENDS["triton" if settings.triton else "torch"](compute_dtype, cpu_kernels)
    name = resolve_attention_backend(requested, device, settings.force_triton)
    return ATTENTION_BACKENDS[name](compute_dtype, cpu_kernels)
