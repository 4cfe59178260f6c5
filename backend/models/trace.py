"""What our attention received in one engine step, per layer: for the lab's "injection, shown" view.

`trace_attention_calls(engine, prompt_token_ids)` runs one real step of the engine (through its public hooks:
`exclusive_steps()` and `step(on_batch=...)`) with a recorder around the attention entry point of its model, then
removes it:

- transformers implementation: the function registered with transformers' `AttentionInterface` under the
  model's `attn_implementation` name is replaced by a recording wrapper for the step (the HF attention modules
  look it up on every call), then registered back;
- native implementation: a forward pre-hook on every `PagedAttention` module.

The step is a mixed one when more than one prompt is given: all prompts but the last are prefilled in an
untraced step first, so the traced step decodes them while it prefills the last one. Our requests are
aborted afterwards (their KV blocks freed); requests of other users that share the step show up in it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from backend.core.sampling import SamplingParams
from backend.models.describe import PAGED_ATTENTION_CLASSES


@dataclass
class AttentionCall:
    """One call into our attention in the traced step."""

    layer: int | None  # the module's layer_idx
    module: str  # qualified module name in the model
    module_class: str
    entry: str  # how the call reached our code
    q_shape: tuple[int, ...]  # as our attention received them
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    scale: float | None
    kwargs: dict[str, str] = field(default_factory=dict)  # the options it received, as short text
    num_tokens: int = 0  # new tokens in the step (all sequences)
    num_seqs: int = 0
    num_prefill: int = 0  # sequences still in their prompt (prefill or a chunk of it)
    num_decode: int = 0  # sequences generating


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _batch_counts(scheduled) -> tuple[int, int, int]:
    """(tokens, prefill sequences, decode sequences) of a ScheduledBatch."""
    prefill = sum(s.num_computed_tokens < len(s.prompt_token_ids) for s in scheduled.seqs)
    return scheduled.num_tokens, prefill, len(scheduled.seqs) - prefill


class _Recorder:
    def __init__(self, model: nn.Module) -> None:
        root = model.hf if hasattr(model, "hf") else model  # names as in describe.module_tree
        self.names = {id(m): name for name, m in root.named_modules()}
        self.calls: list[AttentionCall] = []
        self.counts = (0, 0, 0)

    def add(self, module: nn.Module, entry: str, q, k, v, scale, kwargs: dict) -> None:
        tokens, prefill, decode = self.counts
        self.calls.append(
            AttentionCall(
                layer=getattr(module, "layer_idx", None),
                module=self.names.get(id(module), type(module).__name__),
                module_class=type(module).__name__,
                entry=entry,
                q_shape=tuple(q.shape),
                k_shape=tuple(k.shape),
                v_shape=tuple(v.shape),
                scale=None if scale is None else float(scale),
                kwargs={k_: _short(v_) for k_, v_ in kwargs.items()},
                num_tokens=tokens,
                num_seqs=prefill + decode,
                num_prefill=prefill,
                num_decode=decode,
            )
        )


def _wrap_transformers(model: nn.Module, rec: _Recorder):
    """Replace the registered attention function by a recorder for the step; returns the undo function."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from backend.models import transformers as tm

    name = model.hf.config._attn_implementation
    original = ALL_ATTENTION_FUNCTIONS[name]
    batch_kwarg = getattr(tm, "BATCH_KWARG", "flab_batch")

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        shown = {k: v for k, v in kwargs.items() if k != batch_kwarg}
        rec.add(module, f"AttentionInterface[{name!r}]", query, key, value, scaling, shown)
        return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    AttentionInterface.register(name, recording)
    return lambda: AttentionInterface.register(name, original)


def _hook_native(model: nn.Module, rec: _Recorder):
    """A pre-hook on every PagedAttention module; returns the undo function."""

    def hook(module, args, kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        q, k, v = tensors[:3]
        t = q.shape[0]
        heads, kv_heads = module.num_heads, module.num_kv_heads
        sinks = kwargs.get("sinks", tensors[3] if len(tensors) > 3 else None)
        shown = dict(softcap=module.softcap, sliding_window=module.sliding_window, sinks=sinks)
        rec.add(
            module,
            "PagedAttention.forward",
            q.view(t, heads, -1),  # (T, Hq, D) as paged_attention gets it
            k.view(t, kv_heads, -1),
            v.view(t, kv_heads, -1),
            module.scale,
            shown,
        )

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in model.modules()
        if type(m).__name__ in PAGED_ATTENTION_CLASSES
    ]
    return lambda: [h.remove() for h in handles]


def trace_attention_calls(engine, prompt_token_ids: list[int] | list[list[int]]) -> list[AttentionCall]:
    """One traced engine step (see the module docstring); raises RequestError for bad prompt ids."""
    prompts = [prompt_token_ids] if prompt_token_ids and isinstance(prompt_token_ids[0], int) else prompt_token_ids
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    model = engine.loaded.model
    rec = _Recorder(model)
    ids: list[int] = []
    with engine.exclusive_steps():  # the background loop steps only between our steps
        try:
            for prompt in prompts[:-1]:
                ids.append(engine.add_request(prompt_token_ids=list(prompt), params=params))
            if ids:
                engine.step()  # untraced: prefill the first prompts, so the traced step decodes them
            ids.append(engine.add_request(prompt_token_ids=list(prompts[-1]), params=params))

            def count(batch) -> None:
                rec.counts = _batch_counts(batch)

            undo = _wrap_transformers(model, rec) if hasattr(model, "hf") else _hook_native(model, rec)
            try:
                engine.step(on_batch=count)
            finally:
                undo()
        finally:
            for rid in ids:
                engine.abort(rid)
    return rec.calls
