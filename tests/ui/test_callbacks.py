"""Callbacks called as plain functions on the tiny random-weight model (no server, no browser)."""

from __future__ import annotations

import re
import threading
import time

import gradio as gr
import plotly.graph_objects as go
import pytest

from tests.ui.conftest import LOAD_ARGS
from ui import defaults
from ui.callbacks import Lab
from ui.common import quantization_value
from ui.errors import to_gr_error
from ui.panel import Panel
from ui.session import LoadSpec, Session

COMPARE = dict(
    choice=defaults.RANDOM_CHOICE,
    a_impl="auto",
    a_quant="as in checkpoint",
    b_impl="transformers",
    b_quant="as in checkpoint",
    dtype="float32",
    device="cpu",
    kv_cache_memory_gb=4,
    block_size=16,
    max_num_seqs=16,
    max_model_len=0,
    prompt="Hello world\nThe quick brown fox",
    use_chat_template=False,
    mode="lines",
    copies=1,
    max_new=10,
    ignore_eos=True,
)
BENCH = dict(
    choice=defaults.RANDOM_CHOICE,
    dtype="float32",
    device="cpu",
    quant="none",
    max_len=0,
    trust_remote_code=False,
    workloads=["latency"],
    systems=["flab-native"],
    num_requests=1,
    repeat=1,
)
GEN = dict(
    prompt="Once upon a time",
    use_chat_template=True,
    mode="copies",
    copies=3,
    temperature=0.0,
    top_p=1.0,
    top_k=0,
    max_new=12,
    seed=0,
    ignore_eos=True,
)


def test_builtin_models_in_the_picker(ui_cache):
    """The default is the real instruct model, named as the engine names it; built-in names pass through to the
    engine (which builds them), other values are paths or Hub ids."""
    assert defaults.DEFAULT_CHOICE == "smollm2-135m-instruct" and "random weights" not in defaults.DEFAULT_LABEL
    assert defaults.resolve_choice("") == defaults.resolve_choice(defaults.DEFAULT_CHOICE) == defaults.DEFAULT_CHOICE
    assert defaults.resolve_choice("tiny:llama") == "tiny:llama" and (ui_cache / "config.json").exists()
    assert defaults.resolve_choice("org/model") == "org/model"
    choices = [c for _, c in defaults.builtin_choices()]
    assert choices == ["smollm2-135m-instruct", "tiny:trained", "tiny:llama", "tiny:llava"]
    assert "random weights" in defaults.label_for("tiny:llama") and "random weights" in defaults.label_for("tiny:qwen3")
    assert defaults.label_for("org/model") is None and defaults.label_for("tiny:nope") is None
    assert defaults.suggested_kv_mb(defaults.DEFAULT_CHOICE) == defaults.DEFAULT_KV_MB
    assert defaults.suggested_kv_mb("tiny:qwen3") == defaults.TINY_KV_MB
    assert defaults.suggested_kv_mb("org/model") == defaults.MODEL_KV_MB


def test_estimate_shows_what_the_engine_gets(lab):
    """The estimate for the panel's settings names the context and cache the loaded engine really has."""
    engine = lab.session.current()
    est = lab.picker.estimate(
        LOAD_ARGS["choice"], "float32", "as in checkpoint", LOAD_ARGS["kv_cache_memory_gb"], 0, 16
    )
    kv = engine.describe()["kv_cache"]
    assert f"{kv['num_blocks']:,} blocks of {kv['block_size']} tokens" in est
    assert f"context {engine.max_model_len:,} tokens" in est
    assert "int4" in lab.picker.estimate(LOAD_ARGS["choice"], "float32", "int4:g32", 4, 0, 16)


def test_picker_offline(lab):
    assert lab.offline()  # the tests run with HF_HUB_OFFLINE=1
    assert "Offline" in lab.picker.picker_note()
    assert lab.picker.model_choices()[0] == (defaults.DEFAULT_LABEL, defaults.DEFAULT_CHOICE)
    assert lab.picker.search("llama") == []  # a warning, not an error
    est = lab.picker.estimate(defaults.RANDOM_CHOICE, "auto", "int8", 4, 0, 4)
    assert "Memory estimate" in est and "int8" in est


def test_quantization_labels():
    assert quantization_value("as in checkpoint") is None and quantization_value("none") is None
    assert quantization_value("int4") == "int4"


def test_load_reports_and_reuses(lab):
    engine = lab.session.current()
    status, desc, kv = lab.loader.load(**LOAD_ARGS)
    assert "random weights" in status and "reused" in status and "auto resolved to" in status
    assert lab.session.current() is engine  # nothing changed: same engine
    assert "| **implementation** |" in desc and isinstance(kv, go.Figure)
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, model_impl="transformers"))
    assert lab.session.current() is not engine and engine._closed  # settings changed: old engine closed
    assert "**transformers**" in status and "loaded in" in status


def test_generate_streams_and_frees_blocks(lab):
    updates = list(lab.generate_tab.generate(**dict(GEN, max_new=48)))
    first, rows, status, thr, ttft, batch, mem, summary_rows, kv = updates[-1]
    assert len(rows) == 3 and all(r[1] == "length" and r[2] == 48 for r in rows)
    assert first == rows[0][5] and "done" in status and "KV blocks in use now: 0/" in status
    assert all(isinstance(f, go.Figure) for f in (thr, ttft, batch, mem, kv))
    assert max(batch.data[0].y) == 3  # the three requests shared the batch
    assert dict(summary_rows)["generated tokens"] == "144"
    assert lab.session.current().stats().kv_blocks_used == 0


def test_generate_one_prompt_per_line_and_greedy_copies_agree(lab):
    *_, last = lab.generate_tab.generate(**dict(GEN, prompt="Hello world\n\nThe quick brown fox", mode="lines"))
    rows = last[1]
    assert [r[4] for r in rows] == ["Hello world", "The quick brown fox"]
    *_, last = lab.generate_tab.generate(**GEN)
    texts = [r[5] for r in last[1]]
    assert texts[0] == texts[1] == texts[2]  # greedy copies: same text


def test_stop_aborts_and_frees_kv_blocks(lab):
    gen = lab.generate_tab.generate(**dict(GEN, max_new=400, copies=4, temperature=0.8))
    next(gen)  # running
    stopper = threading.Timer(0.3, lab.stop)
    stopper.start()
    t = time.perf_counter()
    *_, last = gen
    assert time.perf_counter() - t < 10
    assert "stopped" in last[2] and "KV blocks in use now: 0/" in last[2]
    assert all(r[1] == "abort" and r[2] < 400 for r in last[1])
    engine = lab.session.current()
    assert engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0


def test_compare_two_implementations(lab):
    updates = list(lab.compare_tab.compare(**COMPARE))
    status, thr, ttft, mem, batch, table, agree, _ = updates[-1]
    assert "agree token for token" in status
    assert list(table.columns)[0] == "metric" and len(table.columns) == 3
    assert {t.name.split(":")[0] for t in thr.data} == {"A", "B"}
    assert [row[2] for row in agree] == ["identical (10 tokens)"] * 2
    *_, last = lab.compare_tab.compare(**dict(COMPARE, b_impl="auto"))
    assert "same settings" in last[0]


def test_another_users_run_keeps_the_shared_engine(lab):
    """Load (other settings), Compare and Benchmark would replace the one engine: refused while another browser
    session has a run in flight; loading the same settings (a reuse) is fine."""
    engine = lab.session.current()
    other = lab.runs.start("someone-else")
    try:
        status, _, _ = lab.loader.load(**dict(LOAD_ARGS, max_num_seqs=8))
        assert "Engine busy" in status and "1 run(s) of other users" in status
        *_, last = lab.compare_tab.compare(**dict(COMPARE, prompt="Hello", max_new=4))
        assert "Engine busy" in last[0]
        *_, last = lab.benchmark_tab.benchmark(**BENCH)
        assert "Engine busy" in last[0]
        assert lab.session.current() is engine  # untouched
        lab.loader.load(**LOAD_ARGS)  # the same settings: the loaded engine is reused, nobody's run is disturbed
        assert lab.session.current() is engine
    finally:
        lab.runs.finish("someone-else", other)
    lab.loader.load(**dict(LOAD_ARGS, max_num_seqs=8))  # nobody else running: replaced
    assert lab.session.current() is not engine


def test_errors_go_to_the_status_line_and_the_app_keeps_working(lab, tmp_path):
    *_, last = lab.generate_tab.generate(**dict(GEN, prompt="   "))
    assert "prompt" in last[2] and "No prompt" in last[2]
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, choice=str(tmp_path / "missing")))
    assert "Load failed" in status and "ModelNotFoundError" in status
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, kv_cache_memory_gb=0.001))  # a KV budget too small for one block
    assert "KVCacheError" in status
    *_, last = lab.generate_tab.generate(**GEN)
    assert "done" in last[2]


def test_oom_and_unexpected_errors_say_what_to_do():
    import torch

    oom = to_gr_error(torch.OutOfMemoryError("CUDA out of memory"), "loading the model")
    assert oom.title == "Out of memory" and "KV cache budget" in oom.message and "int8/int4" in oom.message
    other = to_gr_error(ZeroDivisionError("boom"))
    assert "still running" in other.message


def test_session_closes_old_engine_only_when_settings_change():
    made, closed = [], []

    class Fake:
        def __init__(self, model, **kw):
            self.kw = kw
            made.append(self)

        def close(self):
            closed.append(self)

    session = Session(engine_factory=Fake)
    a, reused = session.load(LoadSpec.make("m", block_size=16))
    assert not reused
    b, reused = session.load(LoadSpec.make("m", block_size=16))
    assert reused and b is a and not closed
    c, _ = session.load(LoadSpec.make("m", block_size=32))
    assert closed == [a] and c is not a and c.kw["block_size"] == 32
    session.close()
    assert closed == [a, c] and session.current() is None


def test_inspect_without_engine(ui_cache):
    md, fig = Lab().inside_tab.inspect()
    assert md == "_No engine loaded._" and isinstance(fig, go.Figure)


def test_search_online_and_pick_a_result(ui_cache, monkeypatch):
    from backend.loading import hub

    lab = Lab()
    monkeypatch.setattr(lab, "offline", lambda: False)
    found = hub.SearchResults(
        [
            hub.HubModel(
                "org/small",
                downloads=1234,
                likes=5,
                params=135_000_000,
                size_bytes=270 * 2**20,
                gated=False,
                library="transformers",
            )
        ]
    )
    monkeypatch.setattr(hub, "search_models", lambda query, limit=20: found)
    rows = lab.picker.search("small")
    assert rows == [["org/small", "135M", "270.0 MiB", "1,234", "5", "", "transformers"]]
    assert lab.picker.search_table("small").visible is True
    evt = gr.SelectData(None, {"index": [0, 0], "value": "org/small", "row_value": rows[0]})
    assert lab.picker.pick_search_result(evt) == "org/small"
    assert any(value == hub.SUGGESTED_MODELS[0] for _, value in lab.picker.model_choices())  # online: suggestions shown


def test_progress_adapter_reports_bytes_then_weight_loading():
    from backend.loading.hub import DownloadProgress
    from ui.common import progress_adapter

    calls = []
    report = progress_adapter(lambda value, desc=None: calls.append((value, desc)))
    report(DownloadProgress("download", 50, 200, "model.safetensors", 1, 3))
    report(DownloadProgress("done", 200, 200))
    assert calls[0][0] == 0.25 and "model.safetensors" in calls[0][1] and "(1/3 files)" in calls[0][1]
    assert calls[1] == ((0, None), "loading weights into the model (streaming safetensors)…")


# --- issue 17, part 2: what the new-user run found ------------------------------------------------


def test_bug1_a_failed_load_keeps_the_loaded_engine(lab, tmp_path):
    engine = lab.session.current()
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, choice=str(tmp_path / "missing"), model_impl="transformers"))
    assert lab.session.current() is engine and not engine.closed  # refused before the old engine was closed
    assert "Load failed" in status and "still loaded, unchanged" in status
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, kv_cache_memory_gb=0.001))  # memory check sizes the cache
    assert "KVCacheError" in status and "still loaded, unchanged" in status  # refused before it closed anything
    spec = lab.loader.spec(Panel.of(**LOAD_ARGS))
    assert lab.session.spec == spec and lab.session.current() is engine
    *_, last = lab.generate_tab.generate(**GEN)
    assert "done" in last[2]


def test_bug2_the_panel_shows_the_loaded_engine(lab):
    lab.loader.load(**dict(LOAD_ARGS, model_impl="transformers", max_num_seqs=8, kv_cache_memory_gb=2))
    spec = lab.session.spec
    # a page reload: the panel's defaults come in, the loaded engine's settings go out
    *_, out = lab.page.startup(**dict(LOAD_ARGS, model_impl="auto"))
    assert out[1].value == defaults.RANDOM_CHOICE
    # the panel's options in declaration order (ui/panel.app_options)
    assert out[5:16] == ("transformers", "as in checkpoint", "float32", "cpu", False, 16, 2, 0, 8, 2048, "auto")
    assert lab.session.spec == spec
    list(lab.compare_tab.compare(**COMPARE))  # A then B, then the lab's engine again
    assert lab.session.spec == spec
    *_, last = lab.benchmark_tab.benchmark(**BENCH)
    assert lab.session.spec == spec and lab.session.current() is not None and "loaded again" in last[4]


def test_bug3_stop_after_a_run_keeps_its_result(lab):
    *_, last = lab.generate_tab.generate(**GEN)
    assert "done" in last[2]
    assert not isinstance(lab.stop(), str)  # gr.skip(): the finished result stays in the status line


def test_bug4_caps_are_refused_or_shown(lab):
    for bad in (0, -5):
        *_, last = lab.generate_tab.generate(**dict(GEN, max_new=bad))
        assert f"max new tokens: {bad!r} is outside the allowed range: an integer >= 1" in last[2]
    status, _, _ = lab.loader.load(**dict(LOAD_ARGS, kv_cache_memory_gb=0.125))  # 16 blocks: 256 tokens of context
    assert "cut from the model's 512 by the KV cache budget" in status
    *_, last = lab.generate_tab.generate(**dict(GEN, copies=1, max_new=400))
    assert "more than the context leaves" in last[2] and "stopped at the context limit (256 tokens)" in last[2]
    assert last[1][0][1] == "length" and last[1][0][2] < 400


def test_bug5_weights_count_the_same_way_per_implementation(lab):
    from ui.views import weights_text

    native = lab.session.current().describe()
    lab.loader.load(**dict(LOAD_ARGS, model_impl="transformers"))
    hf = lab.session.current().describe()
    assert native["weights_bytes"] != hf["weights_bytes"]  # the RoPE table: native precomputes cos/sin
    assert native["weights_bytes"] - native["rope_table_bytes"] == hf["weights_bytes"] - hf["rope_table_bytes"]
    assert "RoPE table 32.0 KiB" in weights_text(native)


def test_bug6_a_failed_generate_marks_only_its_status(lab):
    updates = list(lab.generate_tab.generate(**dict(GEN, prompt="")))
    assert len(updates) == 1
    out = updates[0]
    assert "No prompt" in out[2]
    assert all(not isinstance(v, str) for i, v in enumerate(out) if i != 2)  # gr.skip(): no error badge


def test_bug7_expected_errors_log_one_line(lab, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    lab.loader.load(**dict(LOAD_ARGS, choice=str(tmp_path / "missing")))
    list(lab.generate_tab.generate(**dict(GEN, prompt="")))
    records = [r for r in caplog.records if r.name == "ui.errors"]
    assert len(records) == 2 and all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
    err = to_gr_error(gr.Error("x"))
    assert err.print_exception is False  # gradio's queue prints no traceback for it


# --- issue 17, part 3: presets and the injection shown ------------------------------------------


# the panel as the page opens (presets.Settings' order): kv_mb, max_batch, step_tokens, max_len, max_new,
# temperature, ignore_eos, gap, chat
PANEL = (4.0, 16, 2048, 0, 64, 0.7, False, 0.0, True)


def _run_preset(lab, key):
    values = lab.presets.preset(key, defaults.RANDOM_CHOICE, *PANEL)
    kv_mb, max_batch, step_tokens, max_len, max_new, temp, ignore_eos, gap, chat = values[:9]
    prompt, mode, copies, status, _ = values[9:]
    lab.loader.load(
        **dict(LOAD_ARGS, kv_cache_memory_gb=kv_mb, max_num_seqs=max_batch, max_model_len=max_len),
        max_num_batched_tokens=step_tokens,
    )
    *_, last = lab.generate_tab.generate(
        **dict(
            GEN,
            prompt=prompt,
            mode=mode,
            copies=copies,
            max_new=max_new,
            temperature=temp,
            ignore_eos=ignore_eos,
            use_chat_template=chat,
        ),
        gap_s=gap,
    )
    return status, last


def _counter(status: str, name: str) -> int:
    import re

    return int(re.search(name + r": \*\*(\d+)", status).group(1))


def test_preset_shared_prefix_hits_the_cache(lab):
    status, last = _run_preset(lab, "prefix")
    assert "Shared system prompt" in status and "done" in last[2]
    hits, queried = re.search(r"prefix cache: \*\*(\d+)/(\d+)", last[2]).groups()
    assert int(hits) >= 3 * 4 and int(queried) > 0  # three later arrivals reuse the system prompt's blocks


def test_preset_staggered_arrivals_join_and_leave(lab, monkeypatch):
    # The tiny model can finish a request's 48 tokens before the next one arrives (0.25 s later) on a fast,
    # quiet machine; every step here takes at least 10 ms, so requests overlap however fast the machine is.
    import time

    from backend.core.runner import ModelRunner

    real = ModelRunner.run
    monkeypatch.setattr(ModelRunner, "run", lambda self, batch: (time.sleep(0.01), real(self, batch))[1])
    _, last = _run_preset(lab, "stagger")
    batch = last[5].data[0].y
    assert max(batch) > 1 and batch[0] == 1 and batch[-1] < max(batch)  # the batch grows, then shrinks


def test_preset_kv_budget_below_need_preempts(lab):
    _, last = _run_preset(lab, "preempt")
    assert "done" in last[2] and _counter(last[2], "preemptions") > 0
    assert all(r[1] == "length" and r[2] == 96 for r in last[1])  # recomputed, finished in full


def test_preset_long_prompt_is_prefilled_in_chunks(lab):
    _, last = _run_preset(lab, "chunked")
    assert "done" in last[2] and _counter(last[2], r"prefill chunks \(steps with prompt tokens\)") >= 6


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_trace_one_step_shows_what_our_attention_received(lab, impl):
    lab.loader.load(**dict(LOAD_ARGS, model_impl=impl))
    (summary, rows, tree) = next(lab.inside_tab.trace("The capital of France is"))
    assert "1 prefill" in summary and "1 decode" in summary
    layers = lab.session.current().describe()["layers"]
    assert [r[0] for r in rows] == list(range(layers))
    entry = "AttentionInterface['fallback_lab_paged']" if impl == "transformers" else "PagedAttention.forward"
    assert {r[2] for r in rows} == {entry}
    assert "flab-hit" in tree and ("attention function injected" if impl == "transformers" else "our paged") in tree
    assert lab.session.current().stats().kv_blocks_used == 0  # the traced requests were aborted


# --- issue 30: presets say what they change and put the panel back ----------------------------------------


def test_preset_says_what_it_changes_and_restore_puts_the_panel_back(lab):
    values = lab.presets.preset("chunked", defaults.RANDOM_CHOICE, *PANEL)
    status, before = values[12], values[13]
    assert values[2] == 48 and "token budget per step 2048 → 48" in status  # the change, in the panel's words
    assert "temperature 0.7 → 0" in status and "put back after it" in status
    assert "KV budget" not in status  # this preset keeps the KV budget: not listed as a change
    back = lab.presets.restore(before, "done: 2 requests")
    assert back[:9] == PANEL  # the panel's own values, the token budget included
    assert back[9].startswith("done: 2 requests") and "settings are back" in back[9] and back[10] is None
    assert "ran with: token budget per step 2048 → 48" in back[9]  # still said after the run's status replaced it
    preempt = lab.presets.preset("preempt", defaults.RANDOM_CHOICE, *PANEL)
    assert preempt[0] != PANEL[0] and "KV budget (MB) 4 → " in preempt[12]
    assert lab.presets.restore(preempt[13], "x")[0] == 4.0
    panel = dict(LOAD_ARGS, kv_cache_memory_gb=back[0], max_num_seqs=back[1], max_num_batched_tokens=back[2])
    status, desc = lab.presets.reload(**panel)  # the Load button's inputs, by option name
    assert "blocks × 16 tokens" in status and dict(lab.session.spec.options)["max_num_batched_tokens"] == 2048


# --- issue 30: Compare warms both sides up, then alternates them ------------------------------------------


def test_compare_warms_both_sides_up_then_alternates_them(lab, monkeypatch):
    """Both engines loaded and warmed up before any measured run; then rounds A, B, A, B (the order of the runs is
    checked, never a time); the table's rates are medians over the rounds with B / A."""
    from ui import compare
    from ui.lab import compare_tab

    events = []
    real_warm, real_workload = compare_tab.warm_up, compare_tab.Workload

    def spy_warm(engine, ids, owner):
        real_warm(engine, ids, owner)
        view = engine.kv_cache_view()
        events.append(("warm", engine.model_impl, engine.stats().kv_blocks_used, sum(b.cached for b in view)))

    def spy_workload(engine, *args, **kwargs):
        events.append(("run", engine.model_impl, engine._closed))
        return real_workload(engine, *args, **kwargs)

    monkeypatch.setattr(compare_tab, "warm_up", spy_warm)
    monkeypatch.setattr(compare_tab, "Workload", spy_workload)
    updates = list(lab.compare_tab.compare(**COMPARE, rounds=2))
    assert events == [
        ("warm", "native", 0, 0),  # done, and no cached prompt left to hit
        ("warm", "transformers", 0, 0),
        ("run", "native", False),  # both engines stay loaded across the rounds
        ("run", "transformers", False),
        ("run", "native", False),
        ("run", "transformers", False),
    ]
    statuses = [u[0] for u in updates if isinstance(u[0], str)]
    running = [s.split(":")[0] + s[s.index("(round") :].split(")")[0] for s in statuses if s.startswith("**Running**")]
    assert list(dict.fromkeys(running)) == [
        "**Running** A(round 1 of 2",
        "**Running** B(round 1 of 2",
        "**Running** A(round 2 of 2",
        "**Running** B(round 2 of 2",
    ]
    status, thr, *_, table, agree, _ = updates[-1]
    assert min(x for t in thr.data for x in t.x) >= 0  # the measured runs' steps only, not the warm-ups'
    assert "A and B loaded and warmed up first" in status and "2 alternated round(s): A, B, A, B" in status
    order = table[table["metric"] == compare.ORDER_ROW].iloc[0].tolist()
    assert order[1:] == ["2: runs 1, 3", "2: runs 2, 4"]
    ratio = table[table["metric"] == f"output tok/s (wall), {compare.RATIO_NOTE}"].iloc[0].tolist()
    assert ratio[1].count("·") == 1 and "× A" in ratio[2]  # both rounds listed; B's median as a ratio to A's
    assert [row[2] for row in agree] == ["identical (10 tokens)"] * 2  # the warm-up changes no output
    assert "rounds gave different" not in status  # greedy rounds repeat their tokens
    assert lab.session.current().model_impl == "native" and not lab.session.current()._closed  # the lab's again


def test_compare_order_and_rounds_are_checked(lab):
    from ui import compare
    from ui.numbers import checked

    assert compare.run_order(["A", "B"], 3) == ["A", "B", "A", "B", "A", "B"]
    assert checked(rounds=2.0) == {"rounds": 2}
    for bad in (0, 6, 1.5, None):
        *_, last = lab.compare_tab.compare(**COMPARE, rounds=bad)
        assert "rounds: " in last[0] and "outside the allowed range: an integer >= 1 and <= 5" in last[0], last[0]


# --- issue 30: the KV map after a run, the trace explained ----------------------------------------------------


def test_generate_leaves_the_kv_map_at_the_runs_peak(lab, monkeypatch):
    from backend.core.runner import ModelRunner
    from ui import plots

    run = ModelRunner.run

    def slow_run(self, batch):  # steps that span the page's updates, however fast the machine (none is timed)
        time.sleep(0.02)
        return run(self, batch)

    monkeypatch.setattr(ModelRunner, "run", slow_run)
    *_, last = lab.generate_tab.generate(**dict(GEN, copies=4, max_new=48, ignore_eos=True))
    kv = last[8]
    assert "at the last run's peak" in kv.layout.title.text
    cells = [v for row in kv.data[0].z for v in row if v is not None]
    assert any(v >= plots.KV_OWNER0 for v in cells)  # blocks held by requests, though all are free now
    assert lab.session.current().stats().kv_blocks_used == 0


def test_trace_explains_one_prefill_and_one_decode(lab):
    from ui import inside

    summary, _, _ = next(lab.inside_tab.trace("The capital of France is"))
    assert inside.WHY_TWO in summary and inside.WARM_PROMPT in summary


def test_the_default_generate_run_shows_a_batch_of_different_requests(lab):
    from ui.lab.run_inputs import prompts_from
    from ui.layout import build_demo

    demo = build_demo(lab, default_model=defaults.RANDOM_CHOICE)
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    prompt, mode, copies = by_id["flab-prompt"].value, by_id["flab-mode"].value, by_id["flab-copies"].value
    prompts = prompts_from(prompt, mode, copies)
    assert len(prompts) >= 4 and len(set(prompts)) == len(prompts)  # one request per line, each different
    assert "one batch" in by_id["flab-prompt"].info  # said next to the box
    *_, last = lab.generate_tab.generate(**dict(GEN, prompt=prompt, mode=mode, copies=copies, ignore_eos=False))
    assert len(last[1]) == len(prompts) and len({row[5] for row in last[1]}) == len(prompts)  # different outputs


# --- issue 29: the CPU kernel path as a Compare setting and in the Inside view --------------------------------


def test_compare_torch_ops_against_fused_kernels(lab):
    """The same implementation on both sides, torch ops (A) against our C++ kernels (B): the labels say which path
    ran, and fp32 greedy tokens agree token for token."""
    args = dict(COMPARE, a_impl="native", b_impl="native", a_kernels="torch", b_kernels="fused")
    status, *_, table, agree, _ = list(lab.compare_tab.compare(**args, rounds=1))[-1]
    engine_ran = "fused" if "B: native · no quant · fused kernels" in table.columns else "torch"
    assert "A: native · no quant · torch kernels" in table.columns, list(table.columns)
    assert "B: native · no quant · " + engine_ran + " kernels" in table.columns
    assert "agree token for token" in status, (status, agree)
    (status, *_), *_ = list(lab.compare_tab.compare(**dict(args, b_kernels="torch")))
    assert "A and B are the same settings" in status


def test_trace_names_the_kernel_path_that_ran(lab):
    from types import SimpleNamespace

    from ui import kernel_path

    spec = lab.session.spec
    lab.session.load(spec.with_options(cpu_kernels="fused"))
    info = lab.session.current().describe()
    summary, _, _ = next(lab.inside_tab.trace("The capital of France is"))
    assert f"`cpu_kernels` → **{info['cpu_kernels']}**" in summary
    if info["cpu_kernels"] == "fused":  # the kernels build on this machine
        assert "torch paged attention (a step with prefill" in summary and "our fused RMSNorm" in summary
        assert "one C++ call (the decode stack" in summary  # the lab's model is Llama-shaped
        lab.session.load(spec.with_options(cpu_kernels="fused", model_impl="transformers"))
        summary, _, _ = next(lab.inside_tab.trace("The capital of France is"))
        assert "torch paged attention (a step with prefill; our C++ decode kernel runs" in summary
        assert "transformers' own modules" in summary
    lab.session.load(spec.with_options(cpu_kernels="torch"))
    summary, _, _ = next(lab.inside_tab.trace("The capital of France is"))
    assert "`cpu_kernels` → **torch** (cpu_kernels='torch')" in summary
    decode = SimpleNamespace(module_class="FusedPagedAttention", num_prefill=0, num_tokens=2)
    assert kernel_path.attention_path(decode) == "our C++ paged decode kernel (decode-only step)"
    text = kernel_path.kernel_path_markdown({"cpu_kernels": "fused", "cpu_kernel_rows": 4}, [decode])
    assert "linears our C++ kernel (2 token rows ≤ 4)" in text and "decode stack" not in text
    wide = SimpleNamespace(module_class="FusedPagedAttention", num_prefill=0, num_tokens=8)
    text = kernel_path.kernel_path_markdown({"cpu_kernels": "fused", "cpu_kernel_rows": 4}, [wide])
    assert "the module they wrap (oneDNN GEMM: 8 token rows > 4" in text
    # the transformers implementation: an HF attention module's call reaches the kernel through the torch backend
    hf_decode = SimpleNamespace(module_class="LlamaAttention", num_prefill=0, num_tokens=1)
    assert kernel_path.attention_path(hf_decode) == "torch paged attention"
    fused = {"cpu_kernels": "fused", "attention_backend": "torch"}
    text = kernel_path.kernel_path_markdown(fused, [hf_decode])
    assert "attention our C++ paged decode kernel (decode-only step, through the injected attention" in text
    assert "transformers' own modules" in text
    torch_text = kernel_path.kernel_path_markdown({"cpu_kernels": "torch", "attention_backend": "torch"}, [hf_decode])
    assert "attention torch paged attention;" in torch_text
