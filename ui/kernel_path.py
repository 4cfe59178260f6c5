"""Which CPU kernel path ran in a traced step (EngineConfig.cpu_kernels; backend/layers/cpu/fused.py): the Inside
tab's per-step breakdown, read from the engine's describe() and the step's attention calls (backend/models/trace.py).

With the fused kernels loaded, each module still picks per call: our paged decode kernel for decode-only steps
(`FusedPagedAttention` in native models; the transformers implementation's injected attention reaches it through the
torch attention backend, which holds the kernels: backend/layers/attention_backends.py), our product for up to
describe()'s `cpu_kernel_rows` rows (`FusedLinear`: 4, 32 for bf16 on AVX512 / AMX), our RMSNorm (native models); larger
products and prefill / mixed steps run the module they wrap. A native Llama-shaped model runs its decode-only steps
through every layer in one C++ call (the decode stack, backend/layers/cpu/decode_stack.py: the same kernels, no Python
between them); a traced step runs module by module, so that its attention calls can be recorded.
"""

from __future__ import annotations

FUSED_ATTENTION = "FusedPagedAttention"


def attention_path(call, backend_kernel: bool = False) -> str:
    """The attention kernel one traced call ran. `backend_kernel`: the engine's torch attention backend holds our
    kernels (cpu_kernels "fused"), so a call of the transformers implementation (an HF attention module calling the
    injected function) runs our paged decode kernel on decode-only steps too."""
    native = call.module_class == FUSED_ATTENTION
    if (native or backend_kernel) and call.num_prefill == 0:
        through = "" if native else ", through the injected attention and the torch backend"
        return f"our C++ paged decode kernel (decode-only step{through})"
    if native or backend_kernel:
        return "torch paged attention (a step with prefill; our C++ decode kernel runs on decode-only steps)"
    return "torch paged attention"


def kernel_path_markdown(info: dict, calls) -> str:
    """The step's kernel path: which kernels ran for attention, linears and norms, and why."""
    chosen = info.get("cpu_kernels") or "torch"
    reason = info.get("cpu_kernels_reason") or ""
    head = f"**Kernel path**: `cpu_kernels` → **{chosen}**" + (f" ({reason})" if reason else "")
    if not calls:
        return head
    c = calls[0]
    if chosen != "fused":
        return f"{head}. In this step: attention {attention_path(c)}; linears and norms as torch ops."
    backend_kernel = info.get("attention_backend", "torch") == "torch"  # the backend that holds our decode kernel
    rows, limit = c.num_tokens, info.get("cpu_kernel_rows", 0)
    linears = (
        f"our C++ kernel ({rows} token rows ≤ {limit})"
        if rows <= limit
        else f"the module they wrap (oneDNN GEMM: {rows} token rows > {limit}, where ours is slower)"
    )
    native = c.module_class == FUSED_ATTENTION
    norms = "our fused RMSNorm (+ residual)" if native else "transformers' own modules (torch ops)"
    stack = (
        " Untraced decode-only steps run every layer in one C++ call (the decode stack: the same kernels, no Python "
        "between them); this traced step ran module by module to record its calls."
        if "one C++ call" in reason
        else ""
    )
    attention = attention_path(c, backend_kernel)
    return f"{head}. In this step: attention {attention}; linears {linears}; norms {norms}.{stack}"
