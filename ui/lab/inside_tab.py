"""The "Inside the engine" tab: one traced step, the module tree, the engine description and the KV block view
(their views: ui/inside.py, ui/views.py, ui/plots.py)."""

from __future__ import annotations

from backend.hosting import check_request
from ui import inside, views
from ui.common import describe
from ui.errors import status_errors
from ui.kernel_path import kernel_path_markdown
from ui.lab.loading import describe_md
from ui.lab.state import LabState
from ui.plots import kv_cache_figure


class InsideTab:
    """What the tab's Trace and Refresh buttons and its live block view call."""

    def __init__(self, state: LabState) -> None:
        self.state = state

    @status_errors("tracing a step", outputs=3, status=0)
    def trace(self, prompt: str):
        """One traced step (backend/models/trace.py): a short request decoding while `prompt` is prefilled.
        Yields (summary markdown, calls table rows, module tree html)."""
        from backend.models.trace import trace_attention_calls

        engine = self.state.engine()
        text = (prompt or "").strip() or "The capital of France is"
        encode = engine.tokenizer.encode
        check_request(self.state.policy, prompt_tokens=len(encode(text)))
        calls = trace_attention_calls(engine, [encode(inside.WARM_PROMPT), encode(text)])
        info = describe(engine)
        yield (
            inside.trace_summary(calls, info.get("implementation", ""))
            + "  \n"
            + kernel_path_markdown(info, calls),  # which CPU kernel path ran (EngineConfig.cpu_kernels)
            inside.trace_rows(calls),
            inside.tree_html(info.get("module_tree")),
        )

    def tree(self) -> str:
        engine = self.state.session.current()
        return inside.tree_html(describe(engine).get("module_tree") if engine is not None else None)

    def inspect(self):
        """-> (engine description markdown, KV block figure)."""
        engine = self.state.session.current()
        if engine is None:
            return views.describe_markdown(None), kv_cache_figure([])
        return describe_md(engine, describe(engine)), kv_cache_figure(engine.kv_cache_view())

    def kv_view(self):
        engine = self.state.session.current()
        return kv_cache_figure(engine.kv_cache_view() if engine is not None else [])
