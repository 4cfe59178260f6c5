"""Attention backends: how the one paged attention layer stores K/V and attends, by name.

A backend does two things: `prepare` the step's metadata once (before the forward; every layer reads it
from the ForwardBatch) and, per layer call, `store` the new K/V into the paged cache and `attend` over it.
The engine chooses one backend when it starts (`engine_kernel_settings`: "auto" is triton on CUDA or with
FLAB_FORCE_TRITON=1, torch elsewhere) and every step uses it; that choice is also the one dispatch rule of every
other op of the engine (flab_kernels/dispatch.py): the triton backend's engine runs the Triton norm, rotary and
activation kernels, the torch backend's the torch math.

    torch   the CPU path and the reference: a per-step plan of block gathers (flab_kernels/attention_torch.py)
    triton  the CUDA kernels (flab_kernels/kv_store.py, flab_kernels/paged_attention.py, flab_kernels/paged_decode.py)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from flab_kernels.attention_args import PagedAttentionArgs
from flab_kernels.attention_torch import build_plan, paged_attention_planned, paged_attention_torch, store_kv_torch
from flab_kernels.dispatch import KernelSettings, current


class AttentionBackend:
    name: ClassVar[str]
    pads_head_dims: ClassVar[bool] = False  # K and V stored at one (padded) head size per cache slot

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype  # the attention math dtype (None = the model's)

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


class TorchAttention(AttentionBackend):
    name = "torch"

    def prepare(self, query_start_loc, seq_lens, block_tables, block_size):
        return build_plan(query_start_loc, seq_lens, block_tables, block_size, self.compute_dtype)

    def store(self, k, v, k_cache, v_cache, slots):
        store_kv_torch(k, v, k_cache, v_cache, slots)

    def attend(self, args, metadata):
        a = args
        return paged_attention_planned(
            a.q, a.k_cache, a.v_cache, metadata, a.scale, a.softcap, a.sliding_window, a.sinks, a.bidirectional
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


def make_attention_backend(requested: str, device: torch.device, compute_dtype=None) -> AttentionBackend:
    """The backend the settings in effect chose (inside an engine: `engine_kernel_settings`)."""
    settings = current()
    if settings.triton is not None and requested == "auto":
        return ATTENTION_BACKENDS["triton" if settings.triton else "torch"](compute_dtype)
    return ATTENTION_BACKENDS[resolve_attention_backend(requested, device, settings.force_triton)](compute_dtype)
